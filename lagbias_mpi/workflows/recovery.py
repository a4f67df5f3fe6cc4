"""Recovery benchmark (issue #15): train on planted truths of known f and measure how well f comes back.

    mpirun -n P python -m lagbias_mpi.bench --recovery --out DIR [--truths corners|full|centre]
        [--settings shipped|all|inputs|both|every] [--config configs/planted.yaml] [--set key=value ...]

One PM run gives the particles (the built-in planted box of ``configs/planted.yaml``'s simulate config,
generated into the cache when missing); each truth f_true = exp(b1 nu + b2 nu^2 + c_lap lambda) / mean
is planted on its two realisations by :func:`lagbias_mpi.nbody.planted.planted_weights` (the same
code as ``simulate``) without re-running the N-body part. Every truth is trained with the shipped
settings (``shipped``), with every particle selected (``all``: ``sampling.frac=1``) and, to measure
training apart from the floor the paper's orthogonalisation sets, with every density eigenvector
kept (``inputs``: ``features.density_components=all``); ``both`` = shipped and all, ``every`` =
the three. A setting that trains as an earlier one on this box (``all`` when the shipped
``sampling.frac: auto`` already selects every particle, :func:`effective_settings`) is not trained
again: its rows repeat the earlier setting's. The validation
box's truth is the same function of the density as the training box's (the training box's moments
of nu and lambda and its normalisation; ``simulate`` standardises each box on its own, which makes
the truths of two boxes differ by their moments). Criteria on the validation box: P_model/P_h at
k < kmax within 2% of 1, median |f/f_true - 1| <= 5% over all particles, global mean f within 1e-3
of a perfect model's (the mean of f_true there), and the training box's mean f within 1e-3 of 1.
Next to each case, the floor the inputs set: the median error of the best exp(quadratic in the
network inputs), fitted on the training box by least squares (the truths are of that form in nu
and lambda, so it is exact when the inputs span them). Writes ``DIR/recovery.json`` and ``DIR/recovery.md`` (the table; docs/results.md holds the measured one).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import yaml

from lagbias_mpi.analysis.quadratic_fit import best_quadratic_f, fit_quadratic_log
from lagbias_mpi.bias.ensemble import load_ensemble, simulation_particles
from lagbias_mpi.bias.routing import route_lagrangian
from lagbias_mpi.config.simulate import PlantedConfig, load_simulate_config
from lagbias_mpi.config.loader import to_dict
from lagbias_mpi.config.train import load_train_config
from lagbias_mpi.core.atomic import write_json
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.io import sources
from lagbias_mpi.io.simfile import load_simulation, write_simulation
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.nbody.planted import planted_weights
from lagbias_mpi.training.sampling import resolve_frac
from lagbias_mpi.workflows.train import run as train_run

log = get_logger("recovery")

GRID = {"b1": (0.5, 1.0, 1.5, 2.0), "b2": (0.0, 0.1, 0.2), "c_lap": (0.0, -0.5, -1.0)}
CENTRE = (1.0, 0.1, -0.5)
SETTINGS = {"shipped": [], "all": ["sampling.frac=1.0"], "inputs": ["features.density_components=all"]}
SETTING_GROUPS = {"shipped": ["shipped"], "all": ["all"], "inputs": ["inputs"], "both": ["shipped", "all"],
                  "every": ["shipped", "all", "inputs"]}
CRITERIA = {"pk_ratio": 0.02, "median_rel_err": 0.05, "mean_f": 1e-3}


def truths(which: str) -> list[tuple[float, float, float]]:
    """(b1, b2, c_lap) of the benchmark: ``centre``, ``corners`` (the 8 corners and the centre) or ``full``."""
    if which == "centre":
        return [CENTRE]
    if which == "corners":
        ends = [(v[0], v[-1]) for v in GRID.values()]
        return list(itertools.product(*ends)) + [CENTRE]
    if which == "full":
        return list(itertools.product(*GRID.values()))
    raise ValueError(f"--truths must be centre, corners or full, got {which!r}")


def replant(comm, src: Path, dst: Path, truth, radius: float, like: dict | None = None) -> dict:
    """``src`` rewritten to ``dst`` with f_true of ``truth`` = (b1, b2, c_lap) at ``radius`` Mpc/h
    (collective). Alone, nu and lambda are standardised on this box and f_true has mean 1 here, as
    ``simulate`` plants it; with ``like`` (the return value of the training box's replant) the training
    box's moments and normalisation are used, so that f_true is the same function of the density in
    both boxes and a perfect model's mean f here is the mean of this f_true (not 1). The particles
    are written in the order of their Lagrangian slabs. Returns {moments, normalisation, mean}."""
    sim = load_simulation(comm, src)
    meta = sim.meta
    # planted_weights reads the IC slab at the particles' lattice points: to their slab owners first
    got = route_lagrangian(comm, {"lagr_index": sim.lagr_index, "pos": sim.pos}, meta.ppd, meta.n_ic,
                           with_ic_index=False)
    sim.lagr_index, sim.pos = got["lagr_index"], got["pos"]
    fft_ic = SlabFFT(comm, meta.n_ic, meta.box, dtype=np.float32)
    pc = PlantedConfig(radius=radius, b1=truth[0], b2=truth[1], c_lap=truth[2])
    f_raw, moments = planted_weights(comm, fft_ic, sim.ic_delta, sim.lagr_index, meta.ppd, pc,
                                     moments=like["moments"] if like else None, return_moments=True)
    own = float(global_sum(comm, f_raw.sum())) / meta.n_particles
    norm = like["normalisation"] if like else own
    sim.f_true = (f_raw / norm).astype(np.float32)
    attrs = {"radius": radius, "b1": truth[0], "b2": truth[1], "c_lap": truth[2], "normalisation": norm,
             "standardisation": "training box's moments" if like else "this box's moments"}
    write_simulation(comm, dst, sim, f_true_attrs=attrs)
    return {"moments": moments, "normalisation": norm, "mean": own / norm}


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half of the total weight lies (pure)."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(np.asarray(weights, np.float64)[order])
    return float(np.asarray(values)[order][np.searchsorted(cum, 0.5 * cum[-1])])


def recovery_errors(comm, f: np.ndarray, f_true: np.ndarray) -> dict:
    """Per-particle recovery over all ranks' particles (gathered on rank 0; fine at benchmark sizes):
    ``median`` of |f / f_true - 1|, ``weighted_median`` of the same with each particle weighted by
    f_true (the error on the halo mass the grid term sees: a particle that carries a negligible part
    of every cell sum is hardly constrained by it), and ``quartile_ratio``: the median of f / f_true
    in each quartile of f_true, lowest first."""
    ratio = np.asarray(f, np.float64) / np.asarray(f_true, np.float64)
    parts = comm.gather((ratio, np.asarray(f_true, np.float64)), root=0)
    out = None
    if comm.rank == 0:
        ratio = np.concatenate([p[0] for p in parts])
        ft = np.concatenate([p[1] for p in parts])
        err = np.abs(ratio - 1.0)
        quart = np.searchsorted(np.quantile(ft, [0.25, 0.5, 0.75]), ft)
        out = {"median": float(np.median(err)), "weighted_median": weighted_median(err, ft),
               "quartile_ratio": [float(np.median(ratio[quart == q])) for q in range(4)]}
    return comm.bcast(out, root=0)


def median_relative_error(comm, f: np.ndarray, f_true: np.ndarray) -> float:
    """Median over all ranks' particles of |f / f_true - 1| (:func:`recovery_errors`)."""
    return recovery_errors(comm, f, f_true)["median"]


def _case_config(base_cfg: Path, out: Path, train_file: Path, val_file: Path) -> Path:
    raw = yaml.safe_load(base_cfg.read_text())
    raw["simulation"] = {"train_files": [str(train_file)], "val_files": [str(val_file)]}
    raw.setdefault("run", {})["figures"] = False
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def recovery_case(comm, cfg_path: Path, out: Path, overrides: list[str], train_file: Path, val_file: Path) -> dict:
    """Train one case and measure the criteria on the validation box (collective)."""
    s = train_run(comm, cfg_path, overrides, out=out / "run")
    ens = load_ensemble(out / "run")
    train = simulation_particles(comm, sources.load(comm, sources.file_spec(train_file)), ens)
    coef = fit_quadratic_log(comm, ens.inputs(train.raw, standardised=True), train.f_true)
    del train
    sim = sources.load(comm, sources.file_spec(val_file))
    parts = simulation_particles(comm, sim, ens)
    theta = ens.inputs(parts.raw, standardised=True)
    f = ens.predict_f_members(theta).mean(axis=0)  # = ens.predict_f(parts.raw, standardised=True)
    f_best = best_quadratic_f(theta, coef)
    errors = recovery_errors(comm, f, parts.f_true)
    row = {"pk_ratio_lowk_val": s["pk_ratio_lowk_val"], "pk_ratio_lowk_train": s["pk_ratio_lowk_train"],
           "pk_ratio_lowk_val_modes": s["pk_ratio_lowk_val_modes"],
           "median_rel_err_val": errors["median"],
           "median_rel_err_val_weighted": errors["weighted_median"],
           "f_over_f_true_val_quartiles": errors["quartile_ratio"],
           # the floor set by the inputs: the best exp(quadratic in theta), fitted on the training box
           "median_rel_err_val_best_quadratic": median_relative_error(comm, f_best, parts.f_true),
           "mean_f": s["mean_f"], "mean_f_val": s["mean_f_val"],
           "members_ok": [m["ok"] for m in s["members_ok"]], "sampling_frac": s["sampling_frac"],
           "train_s": s["stage_wall_s"].get("train"), "polish": s.get("polish")}
    # a perfect model's mean f on the validation box is its true field's weight per particle relative
    # to the training box's (mean_f_val_expected): the mean f criterion is taken against it
    row["mean_f_val_expected"] = s["mean_f_val_expected"]
    row["passes"] = bool(abs(row["pk_ratio_lowk_val"] - 1) <= CRITERIA["pk_ratio"]
                         and row["median_rel_err_val"] <= CRITERIA["median_rel_err"]
                         and abs(row["mean_f"] - 1) <= CRITERIA["mean_f"]
                         and abs(row["mean_f_val"] / row["mean_f_val_expected"] - 1) <= CRITERIA["mean_f"])
    return row


def table(rows: list[dict]) -> str:
    """The markdown table of the benchmark rows."""
    lines = ["| b1 | b2 | c_lap | settings | frac | P_model/P_h val (train) | median abs(f/f_true-1) val "
             "| the same, f_true-weighted | median f/f_true by quartile of f_true | best quadratic in the inputs "
             "| mean f train / val (perfect model) | members ok | passes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['b1']} | {r['b2']} | {r['c_lap']} | {r['settings']} | {r['sampling_frac']:.3g} "
                     f"| {r['pk_ratio_lowk_val']:.4f} ({r['pk_ratio_lowk_train']:.4f}) | {r['median_rel_err_val']:.4f} "
                     f"| {r.get('median_rel_err_val_weighted', float('nan')):.4f} "
                     f"| {' '.join(f'{q:.3f}' for q in r.get('f_over_f_true_val_quartiles', []))} "
                     f"| {r.get('median_rel_err_val_best_quadratic', float('nan')):.4f} "
                     f"| {r['mean_f']:.5f} / {r['mean_f_val']:.5f} ({r['mean_f_val_expected']:.5f}) | {sum(r['members_ok'])}/{len(r['members_ok'])} "
                     f"| {'yes' if r['passes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def effective_settings(config: Path, overrides: list[str], n_particles: int, n_cells: int) -> dict:
    """The resolved training config of a case with ``sampling.frac`` as the fraction it selects on a
    box of ``n_particles`` particles and ``n_cells`` training cells (``auto`` resolved, ``per_cell``
    dropped): two settings with equal dicts train the same (pure but for reading ``config``)."""
    d = to_dict(load_train_config(config, overrides))
    samp = d["sampling"]
    samp["frac"] = resolve_frac(samp["frac"], samp.pop("per_cell"), n_particles, n_cells)
    return d


def run(comm, out: Path, config: Path, which: str = "corners", settings: str = "both",
        overrides: list[str] | None = None, base_dir: Path | None = None) -> dict:
    """The benchmark over ``truths(which)`` x ``settings``; writes recovery.json/.md into ``out``."""
    base_dir = Path(base_dir) if base_dir is not None else sources.PROJECT_ROOT
    out = Path(out)
    cfg = load_train_config(config, list(overrides or []))
    if cfg.simulation.simulate is None:
        raise ValueError(f"{config}: the recovery benchmark needs a built-in planted simulation (simulation.simulate)")
    sim_cfg = load_simulate_config(base_dir / cfg.simulation.simulate, list(cfg.simulation.simulate_set))
    if sim_cfg.halos.kind != "planted":
        raise ValueError(f"{cfg.simulation.simulate}: halos.kind must be planted for the recovery benchmark")
    train_specs, val_specs = sources.resolve_training(comm, cfg.simulation, base_dir)
    src_train, src_val = Path(train_specs[0]["path"]), Path(val_specs[0]["path"])
    if settings not in SETTING_GROUPS:
        raise ValueError(f"--settings must be one of {sorted(SETTING_GROUPS)}, got {settings!r}")
    names = SETTING_GROUPS[settings]
    n_cells = int(round(sim_cfg.box / cfg.grid.cell)) ** 3
    effective = {n: effective_settings(config, list(overrides or []) + SETTINGS[n], sim_cfg.ppd**3, n_cells)
                 for n in names}
    same_as = {n: next((m for m in names[:i] if effective[m] == effective[n]), None) for i, n in enumerate(names)}
    for n, m in same_as.items():
        if m is not None:
            log.info(f"recovery: settings {n} train as {m} on this box (sampling.frac resolves to "
                     f"{effective[n]['sampling']['frac']:.3g}); its rows repeat {m}'s")
    rows = []
    for truth in truths(which):
        tag = "b1_{}_b2_{}_clap_{}".format(*truth)
        tdir = out / tag
        if comm.rank == 0:
            tdir.mkdir(parents=True, exist_ok=True)
        comm.Barrier()
        tr, va = tdir / "train.h5", tdir / "val.h5"
        planted = replant(comm, src_train, tr, truth, sim_cfg.planted.radius)
        val_mean = replant(comm, src_val, va, truth, sim_cfg.planted.radius, like=planted)["mean"]
        done = {}
        for name in names:
            if same_as[name] is not None:
                row = {**done[same_as[name]], "settings": f"{name} (= {same_as[name]})"}
                rows.append(row)
                continue
            cdir = tdir / name
            if comm.rank == 0:
                cdir.mkdir(parents=True, exist_ok=True)
                _case_config(Path(config), cdir, tr, va)
            comm.Barrier()
            log.info(f"recovery: truth b1={truth[0]} b2={truth[1]} c_lap={truth[2]}, settings {name}")
            row = recovery_case(comm, cdir / "config.yaml", cdir, list(overrides or []) + SETTINGS[name], tr, va)
            row.update({"b1": truth[0], "b2": truth[1], "c_lap": truth[2], "settings": name,
                        "mean_f_true_val": val_mean})
            rows.append(row)
            done[name] = row
            log.info(f"recovery: P_model/P_h val {row['pk_ratio_lowk_val']:.4f}, median |f/f_true-1| "
                     f"{row['median_rel_err_val']:.4f}, mean f val {row['mean_f_val']:.5f}, passes {row['passes']}")
            if comm.rank == 0:  # the table so far (a long benchmark shows its progress)
                write_json(out / "recovery.json", {"criteria": CRITERIA, "rows": rows, "config": str(config),
                                                   "overrides": list(overrides or []), "ranks": comm.size})
                (out / "recovery.md").write_text(table(rows))
    return {"criteria": CRITERIA, "rows": rows}
