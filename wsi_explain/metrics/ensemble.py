"""Ensemble spread (Koriakina et al., 2024): how much identically trained models disagree, in
their predictions and in where they look, and how that relates to accuracy."""

from __future__ import annotations

import numpy as np

__all__ = ["ensemble_spread", "fit_spread_relations"]


def ensemble_spread(probs, cam_std, *, positive: int = 1, labels=None) -> dict[str, np.ndarray]:
    """Per-tile spread of an ensemble.

    Parameters
    ----------
    probs : (N, M, K) float, per model softmax probabilities (M models).
    cam_std : (N, h, w) float, per-pixel standard deviation across the models of the attention
        (CAM) map, each model's map min-max normalised first (as stored by the extraction).
    positive : int
        Class whose probability spread is reported.
    labels : (N,) float, optional
        1 / 0 (NaN = unknown) ground truth of the positive class; accuracy of each model is
        whether its prediction (argmax == positive) equals it.

    Returns
    -------
    dict of (N,) float32: ``prob_mean``, ``prob_std`` (of the positive class), ``attn_std`` (mean
    over pixels of ``cam_std``), and with labels ``acc_mean``, ``acc_std`` (over the models; NaN
    where the label is unknown).
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 3:
        raise ValueError(f"probs must be (N, models, classes), got {p.shape}")
    out = {
        "prob_mean": p[:, :, positive].mean(1).astype(np.float32),
        "prob_std": p[:, :, positive].std(1).astype(np.float32),
        "attn_std": np.asarray(cam_std, np.float64).reshape(len(p), -1).mean(1).astype(np.float32),
    }
    if labels is not None:
        y = np.asarray(labels, np.float64)
        correct = ((p.argmax(2) == positive).astype(np.float64) == y[:, None]).astype(np.float64)
        acc_mean, acc_std = correct.mean(1), correct.std(1)
        unknown = np.isnan(y)
        acc_mean[unknown] = np.nan
        acc_std[unknown] = np.nan
        out["acc_mean"], out["acc_std"] = acc_mean.astype(np.float32), acc_std.astype(np.float32)
    return out


def _fit(x: np.ndarray, y: np.ndarray, deg: int) -> dict:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) <= deg:
        return {"coef": [], "r2": float("nan"), "n": int(len(x))}
    V = np.vander(x, deg + 1)  # highest power first, as np.polyfit
    coef, *_ = np.linalg.lstsq(V, y, rcond=None)
    resid = y - V @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"coef": [float(c) for c in coef], "r2": r2, "n": int(len(x))}


def fit_spread_relations(attn_std, acc_mean, acc_std) -> dict[str, dict]:
    """The relations of Koriakina et al.: standard deviation of attention against mean accuracy
    (quadratic) and against standard deviation of accuracy (linear), by least squares.

    Parameters are (P,) arrays over the points (tiles or clusters); NaN points are left out.

    Returns
    -------
    dict with ``attn_std~acc_mean`` and ``attn_std~acc_std``, each ``{"coef": highest power first,
    "r2": float, "n": points}`` (empty coef and NaN R^2 when there are too few points).
    """
    a, m, s = (np.asarray(v, np.float64) for v in (attn_std, acc_mean, acc_std))
    return {"attn_std~acc_mean": _fit(m, a, 2), "attn_std~acc_std": _fit(s, a, 1)}
