"""Tiling benchmark: tissue mask (with pen-ink detection) + grid, per-tile QC, tile read throughput.

Usage::

    .venv/bin/python benchmarks/bench_tiling.py [--size 30000 40000] [--tiles 3000] [--rounds 3] [--keep]

Writes a generated 40,000 x 30,000 px (0.25 µm/px) JPEG pyramidal TIFF under benchmarks/out/
(real-H&E texture is not needed for timing: generated tissue blobs), then measures, in one run:

1. tissue detection (optical density, the slide's stain vectors, ink) + grid at 0.5 µm/px, 224 px;
2. the per-tile QC pass (read every tile of the grid and measure it) against the same threaded
   pass that only reads the tiles, interleaved over ``--rounds`` rounds: the QC's own share;
3. the tiling stage for one slide (mask, grid, 32-tile verify, writes) with and without QC;
4. reading and resizing tiles with 1 and 2 worker processes (one OpenSlide handle each).

Prints a Markdown table to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import tiling

OUT = Path(__file__).resolve().parent / "out"

# tissue blobs in fractions of (H, W): centre y, centre x, radius y, radius x
BLOBS = [(0.3, 0.25, 0.18, 0.15), (0.6, 0.6, 0.25, 0.2), (0.75, 0.2, 0.1, 0.12)]


def render(d: int, y0: int, x0: int, h: int, w: int, *, H: int, W: int) -> np.ndarray:
    rng = np.random.default_rng((y0 * 7919 + x0 * 31 + d) % (2**32))
    ys = (y0 + (np.arange(h) + 0.5) * d)[:, None] / H
    xs = (x0 + (np.arange(w) + 0.5) * d)[None, :] / W
    inside = np.zeros((h, w), bool)
    for cy, cx, ry, rx in BLOBS:
        inside |= ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
    out = np.empty((h, w, 3), np.uint8)
    out[:] = (243, 243, 243)
    if inside.any():
        tissue = np.array([225, 150, 195], np.int16) + rng.integers(-20, 21, size=(h, w, 1), dtype=np.int16)
        nuclei = rng.random((h, w)) < 0.01
        tissue[nuclei] = (90, 50, 140)
        out[inside] = np.clip(tissue[inside], 0, 255)
    return out


def make_slide(size: tuple[int, int], *, mpp: float = 0.25) -> Path:
    """The benchmark slide (cached under benchmarks/out/): JPEG, levels 1, 4, 16..."""
    H, W = size
    path = OUT / f"bench_{W}x{H}_{mpp:g}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        tiling.write_tiled_tiff(path, (H, W), lambda d, y, x, h, w: render(d, y, x, h, w, H=H, W=W), mpp=mpp)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return path


_reader = None


def _init(path: str) -> None:
    global _reader
    _reader = tiling.OpenSlideReader(path)


def _read(rows: list[dict]) -> int:
    for row in rows:
        tiling.read_tile(_reader, row)
    return len(rows)


def read_throughput(path: Path, rows: list[dict], workers: int, chunk: int = 32) -> float:
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(str(path),)) as pool:
        pool.map(_read, chunks[: workers * 2])  # warm up (open handles, caches)
        t0 = time.perf_counter()
        n = sum(pool.imap_unordered(_read, chunks))
        return n / (time.perf_counter() - t0)


def _read_only(tile, stains, lut) -> dict:
    return {}


def qc_vs_read(reader, grid, stains, rounds: int) -> tuple[float, float]:
    """Best-of-``rounds`` seconds of the QC pass and of the same pass reading only, interleaved."""
    qc, read = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tiling.compute_tile_qc(reader, grid, stains, threads=2, measure=_read_only)
        read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tiling.compute_tile_qc(reader, grid, stains, threads=2)
        qc.append(time.perf_counter() - t0)
    return min(qc), min(read)


def per_tile_ms(reader, grid, stains, rounds: int, n: int = 300) -> tuple[float, float]:
    """One thread: milliseconds per tile to read (and resize) and to measure, best of ``rounds``
    interleaved rounds over the same ``n`` tiles (the QC's CPU cost, free of thread contention)."""
    from tiling.stain import od_lut

    rows = grid.iloc[np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)].to_dict("records")
    lut = od_lut(stains.glass)
    read, meas = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tiles = [tiling.read_tile(reader, r) for r in rows]
        read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in tiles:
            tiling.tile_measures(t, stains, lut=lut)
        meas.append(time.perf_counter() - t0)
    return 1000 * min(read) / len(rows), 1000 * min(meas) / len(rows)


def stage_seconds(path: Path, qc: bool, rounds: int) -> float:
    from wsi_explain.core.config import TileConfig
    from wsi_explain.io.slides import SlideSource
    from wsi_explain.stages.tile import tile_slide

    cfg = TileConfig(tile_px=224, mpp_target=0.5, qc=qc)
    best = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            tile_slide(SlideSource(slide_id="bench", path=path), cfg, Path(d) / "bench", fingerprint="bench")
            best.append(time.perf_counter() - t0)
    return min(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", nargs=2, type=int, default=(30000, 40000), metavar=("H", "W"))
    ap.add_argument("--tiles", type=int, default=3000, help="tiles read per throughput measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the QC measurements")
    ap.add_argument("--keep", action="store_true", help="keep the generated slide")
    args = ap.parse_args()
    path = make_slide(tuple(args.size))
    reader = tiling.OpenSlideReader(path)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        tissue = tiling.detect_tissue(reader)
        grid = tiling.make_grid(reader, tissue, tiling.GridSpec(tile_px=224, mpp=0.5))
        times.append(time.perf_counter() - t0)
    print(
        f"slide {reader.info.dimensions}, levels {reader.info.level_downsamples}, {len(grid)} tiles at 0.5 µm, "
        f"stains {tissue.stains.source}"
    )
    qc_s, read_s = qc_vs_read(reader, grid, tissue.stains, args.rounds)
    read_ms, meas_ms = per_tile_ms(reader, grid, tissue.stains, args.rounds)
    # the same tiles read by OpenSlide and by the direct TIFF decoder, one thread, interleaved rounds
    direct = tiling.TiffTileReader(path)
    by_decoder = {"OpenSlide": [], "direct TIFF decoder": []}
    for _ in range(args.rounds):
        by_decoder["OpenSlide"].append(per_tile_ms(reader, grid, tissue.stains, 1)[0])
        by_decoder["direct TIFF decoder"].append(per_tile_ms(direct, grid, tissue.stains, 1)[0])
    direct.close()
    stage_qc, stage_plain = stage_seconds(path, True, args.rounds), stage_seconds(path, False, args.rounds)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(grid), size=min(args.tiles, len(grid)), replace=False)
    rows = grid.iloc[pick].to_dict("records")
    tput = {w: read_throughput(path, rows, w) for w in (1, 2)}
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"openslide {__import__('openslide').__library_version__}"
    )
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| tissue mask (with ink) + grid (224 px at 0.5 µm), best of 3 (target < 1 s) | {min(times):.3f} s |")
    print(f"| tiles in grid | {len(grid)} |")
    print(
        f"| reading every tile, 2 threads (best of {args.rounds}) | {read_s:.2f} s ({len(grid) / read_s:.0f} tiles/s) |"
    )
    print(
        f"| reading + QC of every tile, 2 threads (best of {args.rounds}) | {qc_s:.2f} s ({len(grid) / qc_s:.0f} tiles/s) |"
    )
    print(
        f"| QC's own share over reading every tile, 2 threads (target <= 15 %) | {100 * (qc_s / read_s - 1):+.1f} % |"
    )
    print(
        f"| one thread, per tile: read + resize / QC measures | {read_ms:.2f} ms / {meas_ms:.2f} ms "
        f"({100 * meas_ms / read_ms:.1f} %) |"
    )
    for name, ms in by_decoder.items():
        print(f"| one thread, per tile: read + resize, {name} (best of {args.rounds}) | {min(ms):.2f} ms |")
    print(f"| tiling stage for the slide without QC (mask, grid, 32-tile verify, writes) | {stage_plain:.2f} s |")
    print(f"| tiling stage with QC (every tile read and measured) | {stage_qc:.2f} s ({stage_qc / stage_plain:.1f}x) |")
    for w, v in tput.items():
        print(f"| tile read + resize, {w} worker process(es) | {v:.0f} tiles/s |")
    print(f"| speed-up 2 vs 1 workers | {tput[2] / tput[1]:.2f}x |")
    reader.close()
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
