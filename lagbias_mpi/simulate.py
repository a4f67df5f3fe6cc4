"""The built-in simulation: Gaussian ICs, 2LPT, particle-mesh gravity, FoF halos (or planted truth).

``python -m lagbias_mpi.simulate --config FILE.yaml [--set key=value ...] --out DIR`` (under mpirun
too) writes ``DIR/realisation_{i}.h5`` (schema: docs/file_format.md), ``DIR/summary.json`` and
``DIR/simulate_checks.png``. realisation_0 is for training, the others for validation; realisation i
uses the seed ``seed + i``. See docs/simulate.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mpi4py import MPI

from lagbias_mpi.config.loader import ConfigError
from lagbias_mpi.config.simulate import DEFAULT_CONFIG, load_simulate_config
from lagbias_mpi.core.logs import get_logger, setup_logging
from lagbias_mpi.mpi.comm import abort_on_exception
from lagbias_mpi.nbody.cosmology import CosmologyError
from lagbias_mpi.nbody.run import run_simulation

log = get_logger("simulate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.simulate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", default="runs/simulate", help="output directory")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    setup_logging(comm, args.log_level)

    @abort_on_exception(comm)
    def body():
        cfg = load_simulate_config(args.config, args.set)
        run_simulation(comm, cfg, Path(args.out))

    try:
        body()
    except (ConfigError, CosmologyError) as exc:
        log.error(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
