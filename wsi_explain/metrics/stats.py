"""Bootstrap confidence intervals of per-tile metric values."""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci"]


def bootstrap_ci(values, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of ``values`` with a percentile bootstrap interval; NaNs are left out.

    Returns
    -------
    (mean, low, high, n): NaNs when no finite value; low = high = mean for one value.
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = float(v.mean())
    if n == 1:
        return m, m, m, 1
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_boot, n))].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return m, float(lo), float(hi), n
