"""Clustering: HDBSCAN (labels, membership probabilities, GLOSH outlier scores) fitted on a
sample for large cohorts, or FAISS k-means."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["ClusterResult", "hdbscan_cluster", "kmeans_cluster"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterResult:
    """Per-point clustering.

    Attributes
    ----------
    labels : (n,) int64, -1 for noise
    probabilities : (n,) float32 in [0, 1], membership strength
    outlier_scores : (n,) float32 in [0, 1], higher = more of an outlier
    method : str
    n_fitted : int
        Points the model was fitted on (the rest were assigned).
    guard : str or None
        Set when HDBSCAN's excess-of-mass selection collapsed the cohort into one giant cluster and
        the fit was redone with a maximum cluster size (what happened, in words).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    outlier_scores: np.ndarray
    method: str
    n_fitted: int
    guard: str | None = None


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Clusters renumbered 0.. by decreasing size (ties by old label); noise stays -1."""
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    lut = {old: new for new, old in enumerate(order)}
    return np.array([lut.get(int(v), -1) for v in labels], np.int64)


def hdbscan_cluster(
    Y: np.ndarray,
    *,
    min_cluster_size: int = 50,
    min_samples: int | None = None,
    fit_max: int = 200_000,
    seed: int = 0,
    collapse_share: float = 0.8,
) -> ClusterResult:
    """HDBSCAN on ``Y`` (n, d), typically a 5-10-d UMAP.

    Above ``fit_max`` points, HDBSCAN is fitted on a seeded sample and the rest are assigned with
    ``hdbscan.approximate_predict`` (labels, probabilities) and ``approximate_predict_scores``
    (GLOSH outlier scores). Labels are renumbered by decreasing cluster size.

    Guard: excess-of-mass selection can keep the root of the hierarchy and return one cluster for
    most of the cohort (it prefers a stable parent to its many children). When one cluster holds at
    least ``collapse_share`` of the fitted points, the fit is redone with ``max_cluster_size`` = half
    of them, which makes HDBSCAN pick among the children; ``guard`` says so.
    """
    import hdbscan

    Y = np.ascontiguousarray(Y, np.float64)
    n = len(Y)
    fit_idx = np.arange(n) if n <= fit_max else np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))

    def fit(**extra):
        return hdbscan.HDBSCAN(
            min_cluster_size=int(min_cluster_size),
            min_samples=None if min_samples is None else int(min_samples),
            prediction_data=n > fit_max,
            core_dist_n_jobs=1,
            **extra,
        ).fit(Y[fit_idx])

    model = fit()
    guard = None
    _, counts = np.unique(model.labels_[model.labels_ >= 0], return_counts=True)
    if counts.size and counts.max() >= collapse_share * len(fit_idx) and len(fit_idx) >= 4 * min_cluster_size:
        share = counts.max() / len(fit_idx)
        model = fit(max_cluster_size=len(fit_idx) // 2)
        n_new = len(np.unique(model.labels_[model.labels_ >= 0]))
        guard = (
            f"excess-of-mass selection put {100 * share:.0f}% of the tiles in one cluster; refitted with "
            f"max_cluster_size={len(fit_idx) // 2}: {n_new} clusters"
        )
        logger.warning("HDBSCAN: %s", guard)
    labels = np.full(n, -1, np.int64)
    probs = np.zeros(n, np.float32)
    scores = np.zeros(n, np.float32)
    labels[fit_idx] = model.labels_
    probs[fit_idx] = model.probabilities_
    glosh = np.nan_to_num(np.asarray(model.outlier_scores_, np.float64), nan=0.0)
    scores[fit_idx] = glosh
    if n > fit_max:
        rest = np.setdiff1d(np.arange(n), fit_idx)
        for s in range(0, len(rest), 100_000):
            part = rest[s : s + 100_000]
            lab, strength = hdbscan.approximate_predict(model, Y[part])
            labels[part] = lab
            probs[part] = strength
            scores[part] = np.nan_to_num(hdbscan.approximate_predict_scores(model, Y[part]), nan=0.0)
    return ClusterResult(
        labels=_relabel_by_size(labels),
        probabilities=np.clip(probs, 0, 1).astype(np.float32),
        outlier_scores=np.clip(scores, 0, 1).astype(np.float32),
        method="hdbscan",
        n_fitted=len(fit_idx),
        guard=guard,
    )


def kmeans_cluster(X: np.ndarray, k: int, *, seed: int = 0, niter: int = 25, fit_max: int = 500_000) -> ClusterResult:
    """FAISS k-means with ``k`` clusters on ``X`` (n, d).

    Membership probability: ``1 - d1 / d2`` (d1, d2: distances to the nearest and second
    nearest centroids; 0 on the border, 1 at the centroid). Outlier score: the distance to the
    centroid divided by that cluster's 99th percentile distance, clipped to [0, 1].
    """
    import faiss

    X = np.ascontiguousarray(X, np.float32)
    n, d = X.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    fit = X if n <= fit_max else X[np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))]
    km = faiss.Kmeans(
        d, int(k), niter=niter, seed=seed, verbose=False, max_points_per_centroid=max(256, len(fit) // k + 1)
    )
    km.train(fit)
    D, I = km.index.search(X, min(2, k))
    D = np.sqrt(np.maximum(D, 0))
    labels = I[:, 0].astype(np.int64)
    probs = np.ones(n, np.float32) if k == 1 else (1 - D[:, 0] / np.maximum(D[:, 1], 1e-12)).astype(np.float32)
    scores = np.zeros(n, np.float32)
    for c in range(k):
        m = labels == c
        if m.any():
            ref = np.percentile(D[m, 0], 99) or 1.0
            scores[m] = np.clip(D[m, 0] / ref, 0, 1)
    return ClusterResult(_relabel_by_size(labels), np.clip(probs, 0, 1), scores, "kmeans", len(fit))
