"""Dimensionality reduction: PCA (optional) and UMAP fed with a precomputed FAISS k-NN graph."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from .neighbors import KnnGraph

__all__ = ["pca_reduce", "l2_normalise", "umap_embed"]

logger = logging.getLogger(__name__)


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); returns a new float32 array."""
    X = np.asarray(X, np.float32)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norm > 0, norm, 1.0)


def pca_reduce(X: np.ndarray, n_components: int, *, seed: int = 0, fit_max: int = 200_000) -> np.ndarray:
    """Project rows of ``X`` (n, d) on their first ``n_components`` principal components.

    Fitted on at most ``fit_max`` rows drawn with ``seed`` (then applied to all). Returns
    (n, n_components) float32; ``X`` itself when it already has no more columns.
    """
    import faiss

    X = np.ascontiguousarray(X, np.float32)
    n, d = X.shape
    if n_components >= d:
        return X
    n_components = min(n_components, n)
    fit = X if n <= fit_max else X[np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))]
    pca = faiss.PCAMatrix(d, n_components)
    pca.train(np.ascontiguousarray(fit))
    return pca.apply(X)


def umap_embed(
    X: np.ndarray,
    knn: KnnGraph,
    *,
    n_components: int = 2,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    n_epochs: int | None = None,
) -> np.ndarray:
    """UMAP of ``X`` using the given k-NN graph (``precomputed_knn``): no neighbour search is redone.

    Parameters
    ----------
    X : (n, d) float32
    knn : KnnGraph with at least ``n_neighbors`` neighbours (pruned to ``n_neighbors``)
    seed : int
        UMAP's random_state: results are reproducible (UMAP then runs single-threaded).

    Returns
    -------
    (n, n_components) float32
    """
    import umap

    if knn.indices.shape[1] < n_neighbors:
        raise ValueError(f"k-NN graph has {knn.indices.shape[1]} neighbours, fewer than n_neighbors={n_neighbors}")
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        random_state=seed,
        n_epochs=n_epochs,
        precomputed_knn=(knn.indices[:, :n_neighbors], knn.distances[:, :n_neighbors], None),
    )
    with warnings.catch_warnings():
        # only the notice that transform() is unavailable without a search index (we never call it)
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        # random_state makes UMAP single-threaded, which is what reproducibility costs
        warnings.filterwarnings("ignore", message=r"n_jobs value .* overridden", category=UserWarning)
        Y = reducer.fit_transform(np.asarray(X, np.float32))
    return np.asarray(Y, np.float32)


def umap_cohort(
    X: np.ndarray,
    *,
    n_components: tuple[int, ...] = (2, 5),
    min_dist: tuple[float, ...] = (0.1, 0.0),
    n_neighbors: int = 15,
    fit_max: int = 200_000,
    seed: int = 0,
    knn_method: str = "auto",
    exact_max: int = 50_000,
    timings: dict | None = None,
) -> tuple[dict[int, np.ndarray], dict]:
    """UMAP embeddings of a whole cohort from one FAISS k-NN graph.

    Up to ``fit_max`` rows, UMAP is fitted on all of them. Beyond, it is fitted on a seeded sample
    of ``fit_max`` rows and every other row is placed at the inverse-distance-weighted mean of the
    embeddings of its ``n_neighbors`` nearest sampled rows (found with FAISS): UMAP's cost grows
    faster than linearly, so this keeps a 1M-tile cohort in minutes.

    ``timings``, when given, receives the seconds of each sub-step (knn, umap_<d>d, assign).

    Returns
    -------
    dict n_components -> (n, n_components) float32, and an info dict (k-NN method, rows fitted).
    """
    import time

    from .neighbors import knn_graph, knn_query

    tm = timings if timings is not None else {}
    t0 = time.perf_counter()

    X = np.ascontiguousarray(X, np.float32)
    n = len(X)
    fit_idx = np.arange(n) if n <= fit_max else np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))
    S = X[fit_idx]
    knn = knn_graph(S, n_neighbors, method=knn_method, exact_max=exact_max, seed=seed)
    tm["knn"] = round(time.perf_counter() - t0, 3)
    out = {}
    for dims, md in zip(n_components, min_dist):
        t0 = time.perf_counter()
        out[dims] = umap_embed(S, knn, n_components=dims, n_neighbors=n_neighbors, min_dist=md, seed=seed)
        tm[f"umap_{dims}d"] = round(time.perf_counter() - t0, 3)
    if len(fit_idx) < n:
        t0 = time.perf_counter()
        rest = np.setdiff1d(np.arange(n), fit_idx)
        I, D = knn_query(S, X[rest], n_neighbors, method=knn_method, exact_max=exact_max, seed=seed)
        valid = I >= 0
        w = np.where(valid, 1.0 / (D + 1e-6), 0.0)
        w /= w.sum(1, keepdims=True)
        Ic = np.where(valid, I, 0)
        for dims, Ys in out.items():
            full = np.empty((n, dims), np.float32)
            full[fit_idx] = Ys
            full[rest] = np.einsum("mk,mkd->md", w, Ys[Ic]).astype(np.float32)
            out[dims] = full
        tm["assign"] = round(time.perf_counter() - t0, 3)
    return out, {"knn": knn.method, "n_fitted": int(len(fit_idx))}
