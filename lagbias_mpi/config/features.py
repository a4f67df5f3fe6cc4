"""Feature kinds and the smoothing-scale sets of the paper's Table 1 (Mpc/h): configuration vocabulary.
"""
from __future__ import annotations

KINDS = ("delta", "lap", "g2", "s2")


# Table 1 of the paper (Mpc/h)
SCALE_SETS = {
    "1Rf": (2.83,),
    "3Rf": (1.41, 2.83, 5.66),
    "3Rf+11.3": (1.41, 2.83, 5.66, 11.3),
    "3Rf coarse": (1.0, 2.83, 8.0),
    "3Rf fine": (2.0, 2.83, 4.0),
    "5Rf fine": (1.41, 2.0, 2.83, 4.0, 5.66),
}


def resolve_scales(scales) -> tuple[float, ...]:
    """A Table-1 set name or a list of radii (Mpc/h) -> tuple of radii."""
    if isinstance(scales, str):
        if scales not in SCALE_SETS:
            raise ValueError(f"unknown smoothing-scale set {scales!r}; named sets: {sorted(SCALE_SETS)}")
        return SCALE_SETS[scales]
    out = tuple(float(r) for r in scales)
    if not out:
        raise ValueError("at least one smoothing scale is needed")
    if any(r <= 0 for r in out):
        raise ValueError(f"smoothing scales must be > 0 Mpc/h, got {out}")
    return out
