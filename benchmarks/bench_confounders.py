"""Confounder scan benchmark: the scan of a 1M-tile cohort table (500 slides, 2 labels, 10 clusters,
the 7 QC measures and a 3-level site column), bootstrap over slides with 1000 resamples.

Usage::

    .venv/bin/python benchmarks/bench_confounders.py [--tiles 1000000] [--slides 500] [--boot 1000]

Prints Markdown: the wall time of the whole scan, its rows, and the time per (group, stratum,
variable) cell; then the per-cluster site test on every tile and the site probe on the score
stage's sample (20 tiles per slide, generated embeddings with a weak site signature).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def table(n: int, slides: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sid = np.sort(rng.integers(0, slides, n))
    label = sid % 2
    ink = rng.uniform(0, 0.3, slides)[sid] + rng.normal(0, 0.05, n)
    prob = np.clip(np.where(label == 1, 0.7, 0.1 + ink) + rng.normal(0, 0.05, n), 0, 1)
    df = pd.DataFrame(
        {
            "slide_id": np.char.add("s", sid.astype(str)),
            "label": label,
            "prob_pos": prob,
            "cluster": rng.integers(0, 10, n),
            "site": np.array(["A", "B", "C"])[sid % 3],
            "ink_frac": ink,
        }
    )
    for c in ("tissue_frac", "sharpness", "od_h", "od_e", "brightness", "stained_frac"):
        df[c] = rng.random(n)
    return df


def main() -> None:
    from wsi_explain.metrics.confounders import scan_confounders

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--slides", type=int, default=500)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--probe-dim", type=int, default=512, help="embedding size of the site probe")
    a = ap.parse_args()
    df = table(a.tiles, a.slides)
    t0 = time.perf_counter()
    scan, notes = scan_confounders(df, n_boot=a.boot)
    s = time.perf_counter() - t0
    print(f"## Confounder scan ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n")
    print(
        f"Command: `.venv/bin/python benchmarks/bench_confounders.py --tiles {a.tiles} --slides {a.slides} --boot {a.boot}`\n"
    )
    print("| tiles | slides | rows (group x stratum x variable) | bootstrap | wall s | ms per row |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {a.tiles} | {a.slides} | {len(scan)} | {a.boot} | {s:.1f} | {1000 * s / len(scan):.1f} |")
    top = scan[(scan.cluster == -2) & (scan.stratum == "0")].iloc[0]
    print(f"\nFirst variable in the negative stratum: {top['variable']} (rho {top['rho']:.2f}; planted: ink_frac)")
    _site_tests(df, a.probe_dim)


def _site_tests(df: pd.DataFrame, dim: int) -> None:
    """The per-cluster site test on every tile (1000 permutations over slides) and the site probe on
    the stage's sample (20 tiles per slide; embeddings generated with a weak site shift)."""
    from wsi_explain.metrics.leakage import site_composition, site_probe

    t0 = time.perf_counter()
    comp = site_composition(df["cluster"].to_numpy(), df["site"].to_numpy(), df["slide_id"].to_numpy(), n_perm=1000)
    t_comp = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    sample = df.groupby("slide_id", sort=True).head(20)
    site = sample["site"].map({"A": 0, "B": 1, "C": 2}).to_numpy()
    emb = rng.normal(size=(len(sample), dim)) + 0.3 * np.eye(dim)[site]  # a weak site signature
    t0 = time.perf_counter()
    probe = site_probe(emb, sample["site"].to_numpy(), sample["slide_id"].to_numpy(), n_perm=50)
    t_probe = time.perf_counter() - t0
    print("\n| test | tiles | permutations | wall s | result |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| site composition (per cluster) | {len(df)} | 1000 | {t_comp:.1f} | max TVD {comp['tvd'].max():.3f} |")
    print(
        f"| site probe (D={dim}, grouped 5-fold CV) | {probe['n_tiles']} | 50 | {t_probe:.1f} | "
        f"AUROC {probe['auroc']:.2f}, p {probe['p_value']:.3f} |"
    )


if __name__ == "__main__":
    main()
