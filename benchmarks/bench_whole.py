"""Whole process on one slide: `wsi-explain tile` + `extract` (embeddings and logits) against the
loop a user would write with OpenSlide and torch alone, timed in one process, interleaved.

Usage::

    .venv/bin/python benchmarks/bench_whole.py [--mpp 0.5] [--arch resnet18] [--rounds 2]

The slide is the generated JPEG pyramidal TIFF of ``bench_tiling.make_slide`` (20,000 x 15,000 px
at 0.5 µm, or 40,000 x 30,000 at 0.25 µm with ``--mpp 0.25``). Ours: the tiling stage (tissue
mask, grid of 224 px tiles at 0.5 µm, QC of every tile, writes) and the extraction stage (defaults
of this machine: reader threads, the direct TIFF decoder, batch 32, no CAMs), from an empty run
folder. The bare loop: the same tile coordinates (our grid, so both forward the same tiles; the
tiling is not charged to it), ``openslide.OpenSlide.read_region`` per tile, RGBA -> RGB, a 2x
reduce at 0.25 µm, normalisation, batches of 32 through the same model (channels_last,
inference_mode), one thread reading, nothing written. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tiling import make_slide  # noqa: E402

BATCH = 32


def ours(slide: Path, arch: str) -> tuple[float, float, int]:
    """(tiling s, extraction s, tiles) of the two stages from an empty run folder."""
    from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage
    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.stages.extract import run_extract_stage

    with tempfile.TemporaryDirectory() as d, RunFolder(Path(d) / "run") as run:
        t0 = time.perf_counter()
        [res] = run_tile_stage(run, discover_slides([slide]), TileConfig(tile_px=224, mpp_target=0.5))
        t1 = time.perf_counter()
        run_extract_stage(run, ExtractConfig(arch=arch, num_classes=2, methods=(), device="cpu"))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, res.n_tiles


def bare(slide: Path, tiles, module: torch.nn.Module) -> float:
    """Seconds of the OpenSlide + torch loop over ``tiles`` (x, y, level, read_w, read_h, tile_px)."""
    import openslide
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    s = openslide.OpenSlide(str(slide))
    batch = []
    with torch.inference_mode():
        for i, (x, y, level, rw, rh, px) in enumerate(tiles):
            im = s.read_region((x, y), level, (rw, rh)).convert("RGB")
            if rw != px:
                im = im.reduce(rw // px) if rw % px == 0 else im.resize((px, px), Image.BOX)
            batch.append(np.asarray(im))
            if len(batch) == BATCH or i == len(tiles) - 1:
                xb = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div_(255)
                module(((xb - mean) / std).contiguous(memory_format=torch.channels_last))
                batch = []
    s.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 µm per pixel of the generated slide")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import pandas as pd

    from wsi_explain.core.perf import tune_malloc
    from wsi_explain.explain.load import load_model

    tune_malloc()
    scale = 0.25 / args.mpp
    slide = make_slide((int(30000 * scale), int(40000 * scale)), mpp=args.mpp)
    module = load_model(args.arch, num_classes=2).module.eval().to(memory_format=torch.channels_last)
    res_ours, res_bare = [], []
    for _ in range(args.rounds):
        tile_s, ext_s, n = ours(slide, args.arch)
        res_ours.append((tile_s, ext_s, n))
        # the same tiles, from a tiling of the same slide with the same settings
        with tempfile.TemporaryDirectory() as d:
            from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage

            with RunFolder(Path(d) / "run") as run:
                run_tile_stage(run, discover_slides([slide]), TileConfig(tile_px=224, mpp_target=0.5, qc=False))
            tiles = pd.read_parquet(next((Path(d) / "run" / "slides").glob("*/tiles.parquet")))
            rows = tiles[["x", "y", "level", "read_w", "read_h", "tile_px"]].to_numpy(np.int64).tolist()
        res_bare.append(bare(slide, rows, module))
    best = min(res_ours, key=lambda r: r[0] + r[1])
    tile_s, ext_s, n = best
    b = min(res_bare)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {args.arch} (random init), slide {slide.name}, {n} tiles of 224 px "
        f"at 0.5 µm, best of {args.rounds} interleaved rounds\n"
    )
    print("| | seconds | tiles/s | vs the bare loop |\n| --- | ---: | ---: | ---: |")
    print(f"| bare OpenSlide + torch loop (read, forward; no tiling, nothing written) | {b:.1f} | {n / b:.1f} | 1.00 |")
    print(
        f"| wsi-explain extract alone (embeddings + logits, written) | {ext_s:.1f} | {n / ext_s:.1f} | {b / ext_s:.2f} |"
    )
    print(
        f"| wsi-explain tile + extract (tissue, grid, QC, writes) | {tile_s + ext_s:.1f} | {n / (tile_s + ext_s):.1f} | "
        f"{b / (tile_s + ext_s):.2f} |"
    )


if __name__ == "__main__":
    main()
