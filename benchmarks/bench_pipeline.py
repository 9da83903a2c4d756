"""End-to-end benchmark: slides per hour of `run_pipeline` (tile, extract, cluster, score,
report), serial vs a Dask LocalCluster of 2 workers, with each stage's share of the time.

Usage::

    .venv/bin/python benchmarks/bench_pipeline.py [--generated 20] [--skip-demo]

Cohorts: (1) the demo cohort (7 slides from the real CMU-1 H&E, EfficientNet-Lite0 with the demo
head fitted once beforehand, six fused CAMs); (2) ``--generated`` synthetic H&E slides
(3072 x 3072 px at 0.5 µm/px, 224 px tiles at 0.5 µm/px) with a random-init ResNet-18 and two
CAMs. Both use the same light score settings as the demo. Each configuration runs in a fresh run
folder; the model head fit and the slide generation are not timed. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCORE = dict(
    methods=("gradcam", "hirescam"),
    per_cluster=12,
    steps=8,
    baselines=("blur",),
    road_percentiles=(50,),
    road_tiles=3,
    infidelity_samples=4,
    sensitivity_samples=3,
    sanity_tiles=4,
)


def _run(slides: list[str], out: Path, extract: dict, workers: int) -> tuple[float, dict, int]:
    from wsi_explain.core.config import ClusterConfig, ExtractConfig, ScoreConfig, TileConfig
    from wsi_explain.stages.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        slides=tuple(slides),
        out=str(out),
        tile=TileConfig(),
        extract=ExtractConfig(**extract),
        cluster=ClusterConfig(seed=0),
        score=ScoreConfig(**SCORE),
        workers=workers,
    )
    t0 = time.perf_counter()
    res = run_pipeline(cfg)
    total = time.perf_counter() - t0
    n = sum(v for k, v in res.stages["tile"].items() if k != "failed")
    return total, res.seconds, n


def _table(title: str, rows: list[tuple[str, float, dict, int]]) -> None:
    print(f"\n### {title}\n")
    stages = ("tile", "extract", "cluster", "score", "report")
    print("| executor | slides | wall s | slides/hour | " + " | ".join(f"{s} %" for s in stages) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in stages) + " |")
    for name, total, secs, n in rows:
        shares = " | ".join(f"{100 * secs.get(s, 0) / total:.0f}" for s in stages)
        print(f"| {name} | {n} | {total:.1f} | {3600 * n / total:.0f} | {shares} |")


def demo_cohort(tmp: Path) -> tuple[list[str], dict]:
    from wsi_explain import RunFolder, discover_slides, run_tile_stage
    from wsi_explain.core.config import TileConfig
    from wsi_explain.demo.data import build_demo_cohort
    from wsi_explain.demo.model import train_demo_model

    build_demo_cohort(tmp / "demo_slides", seed=0)
    csv = str(tmp / "demo_slides" / "cohort.csv")
    with RunFolder(tmp / "fit") as run:  # fit the demo head once (not timed)
        run_tile_stage(run, discover_slides([csv]), TileConfig())
        weights = train_demo_model(run, tmp / "model", seed=0)
    return [csv], dict(arch="efficientnet_lite0", weights=str(weights), workers=2)


def generated_cohort(tmp: Path, n: int) -> tuple[list[str], dict]:
    from tests.conftest import synthetic_he
    from tiling import write_pyramidal_tiff

    paths = []
    for i in range(n):
        img, _ = synthetic_he(3072, 3072, seed=100 + i, blob=(0.5, 0.5, 0.35, 0.4))
        paths.append(str(write_pyramidal_tiff(tmp / f"gen_{i:02d}.tif", img, mpp=0.5)))
    return paths, dict(arch="resnet18", num_classes=2, methods=("gradcam", "hirescam"), workers=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generated", type=int, default=20)
    ap.add_argument("--skip-demo", action="store_true")
    a = ap.parse_args()
    import torch

    print(
        f"## Pipeline ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})\n"
    )
    print(f"Command: `.venv/bin/python benchmarks/bench_pipeline.py --generated {a.generated}`")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cohorts = []
        if not a.skip_demo:
            cohorts.append(("Demo cohort (7 slides, EfficientNet-Lite0, six CAMs)", *demo_cohort(tmp)))
        if a.generated:
            cohorts.append(
                (
                    f"Generated cohort ({a.generated} slides, ResNet-18 random init, two CAMs)",
                    *generated_cohort(tmp, a.generated),
                )
            )
        for title, slides, extract in cohorts:
            rows = []
            for name, workers in (("serial", 1), ("LocalCluster, 2 workers", 2)):
                out = tmp / f"run_{workers}_{len(rows)}_{abs(hash(title))}"
                total, secs, n = _run(slides, out, extract, workers)
                rows.append((name, total, secs, n))
                print(f"  {title} / {name}: {total:.1f} s", file=sys.stderr, flush=True)
                shutil.rmtree(out, ignore_errors=True)
            _table(title, rows)


if __name__ == "__main__":
    main()
