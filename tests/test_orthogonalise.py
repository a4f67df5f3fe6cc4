"""Orthogonalisation: unit covariance inside the blocks, n+1 density inputs, rank-count invariance."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.bias import orthogonalise as orth
from lagbias_mpi.bias.features import feature_names


def _raw(n=6000, seed=4):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 9))
    mix = rng.standard_normal((9, 9)) + 2 * np.eye(9)
    return base @ mix + rng.standard_normal(9)


@pytest.mark.mpi
def test_orthogonalise_identity_covariance_and_invariance(comm):
    raw = _raw()
    names = feature_names((1.0, 2.83, 8.0), ("delta", "lap", "g2"))
    lo, hi = np.linspace(0, len(raw), comm.size + 1).astype(int)[comm.rank:comm.rank + 2]
    o = orth.fit(comm, raw[lo:hi], names, n_scales=3)
    ref = orth.fit(MPI.COMM_SELF, raw, names, n_scales=3)
    assert o.matrix.shape == (7, 9)
    assert np.allclose(o.matrix, ref.matrix, atol=1e-10)
    theta = o.apply(raw)
    cov = np.cov(theta.T, bias=True)
    assert np.allclose(cov[:4, :4], np.eye(4), atol=1e-8)  # density block: n + 1 = 4 inputs
    assert np.allclose(cov[4:, 4:], np.eye(3), atol=1e-8)  # g2 block whitened
    assert np.allclose(theta.mean(axis=0), 0, atol=1e-10)
    # density inputs only use delta/lap columns, g2 inputs only g2 columns
    g2_cols = [i for i, n in enumerate(names) if n.startswith("g2")]
    assert np.all(o.matrix[:4, g2_cols] == 0)
    # leading eigenvalues first, signs fixed (largest component positive)
    assert np.all(np.diff(o.eigenvalues[:4]) <= 0)
    vecs = o.matrix * np.sqrt(o.eigenvalues)[:, None]
    assert np.all(vecs[np.arange(7), np.argmax(np.abs(vecs), axis=1)] > 0)


def test_roundtrip_and_degenerate():
    raw = _raw(2000)
    names = feature_names((1.0, 2.0, 4.0), ("delta", "lap", "g2"))
    o = orth.fit(MPI.COMM_SELF, raw, names, 3)
    o2 = orth.Orthogonaliser.from_dict(o.to_dict())
    assert np.array_equal(o.apply(raw[:5]), o2.apply(raw[:5]))
    bad = raw.copy()
    bad[:, 8] = bad[:, 2]  # two identical g2 columns
    with pytest.raises(ValueError, match="degenerate"):
        orth.fit(MPI.COMM_SELF, bad, names, 3)


def test_every_density_eigenvector_kept():
    """``features.density_components: all``: the 6 density columns give 6 whitened inputs (a full
    basis of them: raw recovered exactly), a number keeps that many; the config names bad values."""
    from lagbias_mpi.config.train import FeatureConfig

    raw = _raw(3000)
    names = feature_names((1.0, 2.83, 8.0), ("delta", "lap", "g2"))
    cfg = FeatureConfig(density_components="all")
    o = orth.fit(MPI.COMM_SELF, raw, names, 3, cfg.n_density_components(6))
    assert o.matrix.shape == (9, 9)
    theta = o.apply(raw)
    assert np.allclose(np.cov(theta[:, :6].T, bias=True), np.eye(6), atol=1e-8)
    back = np.linalg.solve(o.matrix, theta.T).T + o.mean  # invertible: nothing of raw is dropped
    assert np.allclose(back, raw, atol=1e-8)
    assert FeatureConfig().n_density_components(6) == 4  # the paper's n_scales + 1
    assert FeatureConfig(density_components=5).n_density_components(6) == 5
    assert FeatureConfig(density_components=9).n_density_components(6) == 6
    for bad in (0, "some", True):
        with pytest.raises(ValueError, match="density_components"):
            FeatureConfig(density_components=bad)
