"""The MIL audit at cohort scale: tile relevance and counterfactual bags for 100 slides x 10,000
tiles (ABMIL, D = 512) on stored embeddings, on CPU.

Per slide (a bag generated in memory: embeddings as the stage reads them from ``features.zarr``,
without the read), the stage's steps are timed one by one with the stage's own functions
(:mod:`wsi_explain.explain.mil_relevance`): the slide score, attention, gradient x input,
Integrated Gradients (32 steps, zero baseline), leave-one-out on a seeded sample of 64 tiles, then
the counterfactual bags of :mod:`wsi_explain.stages.mil`: each of 10 clusters removed and the top 5 %
most relevant tiles removed. Prints Markdown (median and total seconds per step, tiles/s, peak RSS).

Usage::

    .venv/bin/python benchmarks/bench_mil.py [--slides 100] [--tiles 10000] [--dim 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from common import peak_mb

    from wsi_explain.explain import mil_relevance as R
    from wsi_explain.explain.mil import load_mil_head
    from wsi_explain.stages.mil import _score

    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_mil_head("abmil", in_dim=a.dim, n_classes=2)
    rng = np.random.default_rng(0)
    steps = ("score", "attention", "grad_x_input", "integrated_gradients", "leave_one_out_64", "remove_clusters")
    times = {k: [] for k in steps + ("remove_top_5pct",)}
    t_all = time.perf_counter()
    for _ in range(a.slides):
        bag = rng.normal(0, 1, (a.tiles, a.dim)).astype(np.float32)
        cl = rng.integers(0, a.clusters, a.tiles)

        def timed(key, fn):
            t0 = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - t0)
            return out

        timed("score", lambda: _score(model, bag, 1))
        timed("attention", lambda: R.attention_relevance(model, bag))
        timed("grad_x_input", lambda: R.gradient_x_input(model, bag, target=1))
        ig, _ = timed("integrated_gradients", lambda: R.integrated_gradients(model, bag, target=1, steps=32))
        timed("leave_one_out_64", lambda: R.leave_one_out(model, bag, target=1, sample=64, seed=0))
        timed("remove_clusters", lambda: [_score(model, bag[cl != c], 1) for c in range(a.clusters)])
        top = np.argsort(-ig)[: int(0.05 * a.tiles)]
        timed("remove_top_5pct", lambda: _score(model, np.delete(bag, top, axis=0), 1))
    wall = time.perf_counter() - t_all
    print(f"## MIL audit ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU)\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_mil.py --slides {a.slides} --tiles {a.tiles} --dim {a.dim}`\n")
    print(f"ABMIL (D = {a.dim}, hidden 128), {a.slides} slides x {a.tiles} tiles, {a.clusters} clusters.\n")
    print("| step | median s per slide | total s |")
    print("| --- | ---: | ---: |")
    for k, v in times.items():
        print(f"| {k} | {np.median(v):.3f} | {np.sum(v):.1f} |")
    n = a.slides * a.tiles
    print(
        f"\nAll steps: {wall:.1f} s for {n:,} tiles ({wall / a.slides:.2f} s per slide, {n / wall:,.0f} tiles/s); "
        f"peak RSS {peak_mb():.0f} MB."
    )


if __name__ == "__main__":
    main()
