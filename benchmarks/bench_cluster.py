"""Clustering benchmark: wall time and peak RSS of each step on 512-d embeddings, and FAISS-fed
UMAP vs umap-learn's own neighbour search.

Usage::

    .venv/bin/python benchmarks/bench_cluster.py [--sizes 100000 1000000] [--compare-n 100000]

Each size runs in its own process (clean peak RSS). Data: a mixture of 20 Gaussians in 512-d
(float32), as embeddings of a cohort would be stored. Steps as the cluster stage runs them: PCA to
50-d, L2 normalisation, FAISS k-NN (k=15; exact up to 200k, IVF beyond), UMAP 2-D and 5-D from that
graph, HDBSCAN on the 5-D UMAP (fitted on at most 200k tiles, the rest assigned). Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_mb  # noqa: E402


def data(n: int, d: int = 512, k: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    X = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        X[s:e] = centres[labels[s:e]] + rng.standard_normal((e - s, d), dtype=np.float32)
    return X, labels


def run_size(n: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    import clustering as C

    steps = {}

    def step(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        steps[name] = {"s": round(time.perf_counter() - t0, 1), "peak_mb": round(peak_mb())}
        print(f"  {n}: {name} {steps[name]}", file=sys.stderr, flush=True)
        return out

    X, truth = step("generate", data, n)
    Z = step("pca_50", C.pca_reduce, X, 50)
    del X
    Z = C.l2_normalise(Z)
    sub: dict = {}
    t0 = time.perf_counter()
    embs, info = C.umap_cohort(
        Z, n_components=(2, 5), min_dist=(0.1, 0.0), n_neighbors=15, fit_max=200_000, timings=sub
    )
    for name, secs in sub.items():  # sub-steps of one call: the peak is the call's
        steps[name] = {"s": round(secs, 1), "peak_mb": round(peak_mb())}
    print(f"  {n}: knn + umap {round(time.perf_counter() - t0, 1)} s {sub}", file=sys.stderr, flush=True)
    res = step("hdbscan", C.hdbscan_cluster, embs[5], min_cluster_size=max(5, min(100, n // 50)), fit_max=200_000)
    total = sum(v["s"] for k, v in steps.items() if k != "generate")
    return {
        "n": n,
        "steps": steps,
        "total_s": round(total, 1),
        "peak_mb": round(peak_mb()),
        "knn": info["knn"],
        "ari": round(float(adjusted_rand_score(truth, res.labels)), 3),
        "clusters": int(res.labels.max() + 1),
    }


def compare_cold(n: int, variant: str) -> dict:
    """One variant in a fresh process, numba compilation included: what a CLI run pays."""
    import umap

    import clustering as C

    Z = C.l2_normalise(C.pca_reduce(data(n)[0], 50))
    t0 = time.perf_counter()
    if variant == "faiss":
        C.umap_embed(Z, C.knn_graph(Z, 15), n_components=2, n_neighbors=15, min_dist=0.1)
    else:
        umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=0).fit_transform(Z)
    return {"s": round(time.perf_counter() - t0, 1)}


def compare(n: int) -> dict:
    """UMAP 2-D with our FAISS graph (its build included) vs umap-learn computing its own."""
    import umap

    import clustering as C

    # warm up both paths on a small set first: numba compiles UMAP's and pynndescent's functions on
    # first use (15-30 s), which would otherwise land on whichever variant runs first
    W = C.l2_normalise(C.pca_reduce(data(3000, seed=1)[0], 50))
    C.umap_embed(W, C.knn_graph(W, 15), n_components=2, n_neighbors=15, min_dist=0.1)
    umap.UMAP(
        n_components=2, n_neighbors=15, min_dist=0.1, random_state=0, force_approximation_algorithm=True
    ).fit_transform(W)
    X, _ = data(n)
    Z = C.l2_normalise(C.pca_reduce(X, 50))
    t0 = time.perf_counter()
    knn = C.knn_graph(Z, 15)
    C.umap_embed(Z, knn, n_components=2, n_neighbors=15, min_dist=0.1)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=0).fit_transform(Z)
    plain = time.perf_counter() - t0
    return {"n": n, "faiss_fed_s": round(ours, 1), "plain_s": round(plain, 1), "speedup": round(plain / ours, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--compare-n", type=int, default=100_000, help="0 to skip the UMAP comparison")
    ap.add_argument("--_child", choices=["size", "compare", "cold-faiss", "cold-plain"], help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child == "size":
        print(json.dumps(run_size(args._n)))
        return
    if args._child == "compare":
        print(json.dumps(compare(args._n)))
        return
    if args._child in ("cold-faiss", "cold-plain"):
        print(json.dumps(compare_cold(args._n, args._child.removeprefix("cold-"))))
        return

    def child(kind: str, n: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--_child", kind, "--_n", str(n)], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        sys.stderr.write(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = [child("size", n) for n in args.sizes]
    cmp = child("compare", args.compare_n) if args.compare_n else None
    cold = {v: child(f"cold-{v}", args.compare_n)["s"] for v in ("faiss", "plain")} if args.compare_n else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; UMAP seeded (single-threaded, reproducible)")
    names = list(dict.fromkeys(k for r in results for k in r["steps"]))
    if results:
        print(
            "| tiles | "
            + " | ".join(f"{s} (s / peak MB)" for s in names)
            + " | total (s, without generate) | peak RSS (MB) | k-NN | ARI vs truth |"
        )
        print("|" + " --- |" * (len(names) + 5))
    for r in results:
        cells = " | ".join(
            f"{r['steps'][s]['s']} / {r['steps'][s]['peak_mb']}" if s in r["steps"] else "-" for s in names
        )
        print(f"| {r['n']:,} | {cells} | {r['total_s']} | {r['peak_mb']} | {r['knn']} | {r['ari']} |")
    if cmp:
        print()
        print("| tiles | process | FAISS graph + UMAP 2-D (s) | umap-learn with its own search (s) | speed-up |")
        print("| --- | --- | --- | --- | --- |")
        print(
            f"| {cmp['n']:,} | warm (numba compiled beforehand) | {cmp['faiss_fed_s']} | {cmp['plain_s']} | {cmp['speedup']}x |"
        )
        print(
            f"| {cmp['n']:,} | cold (fresh process each, as a CLI run) | {cold['faiss']} | {cold['plain']} | "
            f"{cold['plain'] / cold['faiss']:.2f}x |"
        )


if __name__ == "__main__":
    main()
