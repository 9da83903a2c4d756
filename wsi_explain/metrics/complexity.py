"""Complexity of the maps themselves (cheap: run on every tile from the stored maps)."""

from __future__ import annotations

import numpy as np

__all__ = ["gini", "entropy", "mass_share"]


def gini(maps) -> np.ndarray:
    """Sparseness as the Gini index of |map| (Chalasani et al., 2020; Quantus's ``Sparseness``):
    0 = relevance spread evenly, towards 1 = on few pixels. (N, h, w) -> (N,) float32; 0 for an
    all-zero map."""
    a = np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1) + 1e-7
    a = np.sort(a, axis=1)
    n = a.shape[1]
    k = np.arange(1, n + 1)
    return ((np.sum((2 * k - n - 1) * a, axis=1)) / (n * np.sum(a, axis=1))).astype(np.float32)


def entropy(maps) -> np.ndarray:
    """Complexity as the Shannon entropy (nats) of the fractional contribution |a_i| / sum |a|
    (Bhatt et al., 2020; Quantus's ``Complexity``). (N, h, w) -> (N,) float32; log(h*w) at most."""
    a = np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1)
    tot = a.sum(1, keepdims=True)
    p = a / np.where(tot > 0, tot, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return h.astype(np.float32)


def mass_share(maps, region) -> np.ndarray:
    """Share of the positive relevance that falls on ``region`` (N, h, w) bool, e.g. tissue cells;
    NaN for an all-zero map. Returns (N,) float32."""
    m = np.clip(np.asarray(maps, np.float64), 0, None).reshape(len(maps), -1)
    r = np.asarray(region, bool).reshape(len(m), -1)
    tot = m.sum(1)
    return np.where(tot > 0, (m * r).sum(1) / np.where(tot > 0, tot, 1), np.nan).astype(np.float32)
