"""k-nearest neighbours with FAISS: exact for small cohorts, HNSW or IVF beyond a threshold,
on the GPU when faiss has GPUs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["KnnGraph", "knn_graph", "knn_query", "faiss_gpus", "save_index", "NeighbourIndex"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnGraph:
    """k-NN of every point, itself included first (as UMAP expects).

    Attributes
    ----------
    indices : (n, k) int64
    distances : (n, k) float32, Euclidean (not squared)
    method : str
        "exact", "hnsw" or "ivf" (+ "-gpu").
    """

    indices: np.ndarray
    distances: np.ndarray
    method: str


def _build_index(X: np.ndarray, *, method: str, exact_max: int, use_gpu, seed: int, nprobe: int, hnsw_m: int, k: int):
    import faiss

    n, d = X.shape
    gpu = faiss_gpus() > 0 if use_gpu == "auto" else bool(use_gpu)
    if method == "auto":
        method = "exact" if n <= exact_max else "ivf"
    if method == "exact":
        index = faiss.IndexFlatL2(d)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = max(64, 2 * k)
    elif method == "ivf":
        nlist = int(max(16, min(65_536, 4 * np.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = seed
        train = X if n <= 50 * nlist else X[np.random.default_rng(seed).choice(n, 50 * nlist, replace=False)]
        index.train(train)
        index.nprobe = nprobe
    else:
        raise ValueError(f"unknown k-NN method {method!r}; use auto, exact, hnsw or ivf")
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        method += "-gpu"
    index.add(X)
    return index, method


def _search(index, Q: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(Q)
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)
    for s in range(0, n, batch):
        D[s : s + batch], I[s : s + batch] = index.search(Q[s : s + batch], k)
    return D, I


def knn_query(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    method: str = "auto",
    exact_max: int = 50_000,
    use_gpu: str | bool = "auto",
    seed: int = 0,
    batch: int = 65_536,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``base`` for each row of ``queries``.

    Returns
    -------
    indices (m, k) int64 into ``base`` (-1 where fewer were found), distances (m, k) float32 (Euclidean).
    """
    base = np.ascontiguousarray(base, np.float32)
    index, _ = _build_index(
        base, method=method, exact_max=exact_max, use_gpu=use_gpu, seed=seed, nprobe=16, hnsw_m=32, k=k
    )
    D, I = _search(index, np.ascontiguousarray(queries, np.float32), int(min(k, len(base))), batch)
    return I, np.sqrt(np.maximum(D, 0.0), dtype=np.float32)


def faiss_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def knn_graph(
    X: np.ndarray,
    k: int,
    *,
    method: str = "auto",
    exact_max: int = 50_000,
    use_gpu: str | bool = "auto",
    seed: int = 0,
    nprobe: int = 16,
    hnsw_m: int = 32,
    batch: int = 65_536,
) -> KnnGraph:
    """The k-NN graph of the rows of ``X``.

    Parameters
    ----------
    X : (n, d) float32
        Not modified.
    k : int
        Neighbours per point, the point itself included.
    method : {"auto", "exact", "hnsw", "ivf"}
        "auto": exact up to ``exact_max`` points, IVF beyond (deterministic for a seed; HNSW is
        faster to search but its multithreaded build depends on thread scheduling).
    use_gpu : "auto" or bool
        GPU index when faiss was built with GPUs and some are visible.
    seed : int
        Seeds IVF's k-means training and HNSW's level draws.

    Returns
    -------
    KnnGraph
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = len(X)
    if n < 2:
        raise ValueError(f"need at least 2 points for a k-NN graph, got {n}")
    k = int(min(k, n))
    index, method = _build_index(
        X, method=method, exact_max=exact_max, use_gpu=use_gpu, seed=seed, nprobe=nprobe, hnsw_m=hnsw_m, k=k
    )
    D, I = _search(index, X, k, batch)
    # make every point its own first neighbour at distance 0 (approximate indexes may miss it)
    rows = np.arange(n)
    first_is_self = I[:, 0] == rows
    if not first_is_self.all():
        bad = ~first_is_self
        I[bad, 1:] = I[bad, :-1]
        D[bad, 1:] = D[bad, :-1]
        I[bad, 0], D[bad, 0] = rows[bad], 0.0
    missing = I < 0  # IVF may find fewer than k: point those slots at the point itself
    if missing.any():
        I[missing] = np.broadcast_to(rows[:, None], I.shape)[missing]
        D[missing] = 0.0
    D = np.sqrt(np.maximum(D, 0.0), dtype=np.float32)
    logger.debug("k-NN graph: %d points, k=%d, %s", n, k, method)
    return KnnGraph(indices=I, distances=D, method=method)


def save_index(X: np.ndarray, path, *, method: str = "auto", exact_max: int = 50_000, seed: int = 0) -> str:
    """Build a CPU FAISS index over the rows of ``X`` (n, d) and write it to ``path``
    (``faiss.write_index``; written beside and renamed, so a killed run leaves no half file).
    Returns the method ("exact", "hnsw" or "ivf"). :class:`NeighbourIndex` reads it back."""
    import os

    import faiss

    X = np.ascontiguousarray(X, np.float32)
    index, used = _build_index(
        X, method=method, exact_max=exact_max, use_gpu=False, seed=seed, nprobe=16, hnsw_m=32, k=32
    )
    tmp = f"{path}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)
    return used


class NeighbourIndex:
    """A saved index (:func:`save_index`) that answers "which rows are like row ``i``?".

    Parameters
    ----------
    path : str or Path
        The index file; a missing or unreadable file raises ``OSError`` / ``RuntimeError`` from FAISS.
    """

    def __init__(self, path) -> None:
        import faiss

        self.index = faiss.read_index(str(path))
        try:  # IVF indexes need a direct map to give back a stored vector
            faiss.extract_index_ivf(self.index).make_direct_map()
        except RuntimeError:
            pass

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def similar(self, rows, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest other rows of each of ``rows`` (by their stored vectors).

        Returns
        -------
        indices (m, k) int64 (-1 where fewer exist), distances (m, k) float32 (Euclidean), nearest
        first, the row itself left out.
        """
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range: the index holds {len(self)} rows")
        Q = np.stack([self.index.reconstruct(int(r)) for r in rows]) if len(rows) else np.zeros((0, self.index.d))
        k1 = int(min(k + 1, len(self)))
        D, I = _search(self.index, np.ascontiguousarray(Q, np.float32), k1, 65_536)
        out_i = np.full((len(rows), k), -1, np.int64)
        out_d = np.full((len(rows), k), np.nan, np.float32)
        for j, r in enumerate(rows):
            keep = [(i, d) for i, d in zip(I[j], D[j]) if i >= 0 and i != r][:k]
            out_i[j, : len(keep)] = [i for i, _ in keep]
            out_d[j, : len(keep)] = np.sqrt(np.maximum([d for _, d in keep], 0.0))
        return out_i, out_d
