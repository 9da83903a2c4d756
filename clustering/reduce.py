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
