"""Overlay tiles of the deep-zoom pyramid (:mod:`wsi_explain.io.deepzoom`): a method's heat map
stitched from the stored per-tile maps, and the QC masks. Both are RGBA PNGs of ``tile_px`` px
drawn over the tissue tiles; their opacity is set in the browser.

- **Heat map** (``heat``): every tile's stored map (CAM or attribution, raw values) is placed in
  its footprint on a slide-wide canvas of map cells (overlaps averaged), scaled by the slide's
  99th percentile (as :func:`viz.overlay.stitch_heatmap`), and sampled bilinearly between cell
  centres at each output pixel, so the map is smooth across tile borders at every zoom. Jet
  colours; transparent where no tile has a map.
- **QC** (``qc``): pen ink from the coded tissue mask of the tile stage (``tissue.png``, codes 2
  and 3; magenta) and the tiles whose sharpness is under the run's ``min_sharpness`` (blurred;
  blue).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_explain.io.deepzoom import BLANK_PNG, DeepZoomTiles
from wsi_explain.io.tile_images import SAFE_ID, TileImageError

__all__ = ["OverlayTiles", "heat_canvas"]

logger = logging.getLogger(__name__)

#: colours (RGBA) of the QC layer
INK_RGBA = (255, 0, 255, 220)
BLUR_RGBA = (0, 120, 255, 150)
#: largest side of a slide's heat canvas in cells (maps are pooled onto coarser cells beyond it)
MAX_CANVAS = 4096


def heat_canvas(boxes: np.ndarray, maps: np.ndarray, *, width: int, height: int) -> tuple[np.ndarray, float]:
    """A slide-wide canvas of map values.

    Parameters
    ----------
    boxes : (n, 3) level-0 ``x, y, size0`` of the tiles (px).
    maps : (n, h, w) raw non-negative maps of those tiles (NaN rows are skipped).
    width, height : the slide's level-0 size in px.

    Returns
    -------
    canvas : (H, W, 2) float32: value (scaled by the slide's 99th percentile, clipped to [0, 1])
        and coverage weight (1 under a tile, 0 elsewhere), one cell per ``cell`` level-0 px.
    cell : float, level-0 px per canvas cell.
    """
    from PIL import Image

    maps = np.asarray(maps, np.float32)
    boxes = np.asarray(boxes, np.float64)
    keep = np.isfinite(maps).all(axis=(1, 2)) if len(maps) else np.zeros(0, bool)
    maps, boxes = maps[keep], boxes[keep]
    if not len(maps):
        return np.zeros((1, 1, 2), np.float32), float(max(width, height))
    cell = max(float(np.median(boxes[:, 2])) / maps.shape[-1], max(width, height) / MAX_CANVAS)
    H, W = int(np.ceil(height / cell)), int(np.ceil(width / cell))
    acc = np.zeros((H, W, 2), np.float32)
    vmax = float(np.percentile(maps, 99))
    vmax = vmax if vmax > 0 else 1.0
    for (x, y, s), m in zip(boxes, maps):
        c0, r0 = int(round(x / cell)), int(round(y / cell))
        c1, r1 = max(c0 + 1, int(round((x + s) / cell))), max(r0 + 1, int(round((y + s) / cell)))
        if c0 >= W or r0 >= H or c1 <= 0 or r1 <= 0:
            continue
        patch = np.asarray(Image.fromarray(m, mode="F").resize((c1 - c0, r1 - r0), Image.BILINEAR)) / vmax
        ys, xs = slice(max(r0, 0), min(r1, H)), slice(max(c0, 0), min(c1, W))
        acc[ys, xs, 0] += np.clip(patch[ys.start - r0 : ys.stop - r0, xs.start - c0 : xs.stop - c0], 0, 1)
        acc[ys, xs, 1] += 1
    cover = acc[..., 1] > 0
    acc[cover, 0] /= acc[cover, 1]
    acc[cover, 1] = 1
    return acc, cell


def _sample(canvas: np.ndarray, cell: float, x0: int, y0: int, d: int, n: int, order: int = 1) -> np.ndarray:
    """Canvas values at the centres of an (n, n) tile's pixels (level-0 origin x0, y0; d level-0 px
    per pixel) -> (n, n, C) float32 (0 outside the canvas)."""
    from scipy import ndimage as ndi

    centres = (np.arange(n) + 0.5) * d
    u = (x0 + centres) / cell - 0.5
    v = (y0 + centres) / cell - 0.5
    if order == 0:  # nearest cell
        ri = np.clip(np.floor(v + 0.5).astype(int), -1, canvas.shape[0])
        ci = np.clip(np.floor(u + 0.5).astype(int), -1, canvas.shape[1])
        pad = np.pad(canvas, ((1, 1), (1, 1), (0, 0)))
        return pad[ri[:, None] + 1, ci[None, :] + 1].astype(np.float32)
    vv, uu = np.meshgrid(v, u, indexing="ij")
    out = [
        ndi.map_coordinates(canvas[..., k], [vv, uu], order=1, mode="grid-constant", cval=0.0)
        for k in range(canvas.shape[-1])
    ]
    return np.stack(out, -1).astype(np.float32)


class OverlayTiles:
    """Heat-map and QC tiles of a run's slides.

    Parameters
    ----------
    run_path : a clustered run.
    pyramid : the run's :class:`DeepZoomTiles` (geometry and the tile cache).
    tiles : the cohort tile table (slide_id, tile_id, x, y, size0 and, for the QC layer, sharpness).
    """

    def __init__(self, run_path: str | Path, pyramid: DeepZoomTiles, tiles: pd.DataFrame) -> None:
        self.run_path = Path(run_path).resolve()
        self.pyramid = pyramid
        self._tiles = {sid: g.sort_values("tile_id") for sid, g in tiles.groupby("slide_id")}
        self._canvases: dict[tuple[str, str], tuple[np.ndarray, float]] = {}  # least recently used first
        self._qc_inputs: dict[str, tuple[np.ndarray, float, np.ndarray]] = {}
        self._methods: dict[str, list[str]] = {}
        self.keep = 8
        self._lock = threading.Lock()

    def methods(self, slide_id: str) -> list[str]:
        """The maps stored for a slide (CAMs, then attributions)."""
        from wsi_explain.io.features import open_store, stored_methods

        if slide_id not in self._methods:
            p = self.run_path / "slides" / slide_id / "features.zarr"
            self._methods[slide_id] = stored_methods(open_store(p)) if slide_id in self._tiles and p.exists() else []
        return self._methods[slide_id]

    def _maps(self, slide_id: str, method: str) -> tuple[np.ndarray, np.ndarray]:
        from wsi_explain.io.features import open_store, read_maps

        t = self._tiles[slide_id]
        g = open_store(self.run_path / "slides" / slide_id / "features.zarr")
        have, maps = read_maps(g, method, t["tile_id"].to_numpy(np.int64))
        return t[["x", "y", "size0"]].to_numpy(np.float64)[have], maps

    def _check_method(self, slide_id: str, method: str) -> None:
        if not isinstance(method, str) or not SAFE_ID.match(method) or method not in self.methods(slide_id):
            raise TileImageError(f"slide {slide_id}: unknown method {method!r}")

    def canvas(self, slide_id: str, method: str) -> tuple[np.ndarray, float]:
        """The slide's heat canvas of ``method`` (see :func:`heat_canvas`), built once and kept for
        the last :attr:`keep` (slide, method) pairs asked for; built outside the shared lock."""
        self._check_method(slide_id, method)
        key = (slide_id, method)
        with self._lock:
            hit = self._canvases.pop(key, None)
        if hit is None:
            boxes, maps = self._maps(slide_id, method)
            s = self.pyramid.slides[slide_id]
            hit = heat_canvas(boxes, maps, width=s.width, height=s.height)
        with self._lock:
            self._canvases[key] = hit
            for k in list(self._canvases)[: max(0, len(self._canvases) - self.keep)]:
                self._canvases.pop(k)
        return hit

    def heat_rgba(self, slide_id: str, method: str, z: int, x: int, y: int) -> np.ndarray | None:
        """(tile_px, tile_px, 4) uint8 heat-map tile, or None outside the slide."""
        from viz.overlay import jet

        x0, y0, w0, h0, d = self.pyramid.region(slide_id, z, x, y)
        canvas, cell = self.canvas(slide_id, method)
        if w0 == 0 or h0 == 0:
            return None
        n = self.pyramid.tile_px
        vw = _sample(canvas, cell, x0, y0, d, n)
        w = np.clip(vw[..., 1], 0, 1)
        v = np.where(w > 1e-6, vw[..., 0] / np.maximum(w, 1e-6), 0)
        out = np.zeros((n, n, 4), np.uint8)
        out[..., :3] = jet(v)
        out[..., 3] = np.round(w * 255).astype(np.uint8)
        return out

    def _qc(self, slide_id: str) -> tuple[np.ndarray, float, np.ndarray]:
        """The slide's QC inputs, read once: (ink mask (h, w, 1) float32, level-0 px per mask px,
        (m, 3) level-0 ``x, y, size0`` of the blurred tiles)."""
        from PIL import Image

        from wsi_explain.io.tile_table import read_tile_table

        with self._lock:
            if slide_id not in self._qc_inputs:
                sdir = self.run_path / "slides" / slide_id
                _, meta = read_tile_table(sdir / "tiles.parquet")
                p = sdir / "tissue.png"
                mask = np.asarray(Image.open(p)) if p.exists() else np.zeros((1, 1), np.uint8)
                scale = float(meta.get("tissue_mask_scale") or 1.0) if p.exists() else 1e9
                mss = (meta.get("tiling_config") or {}).get("min_sharpness")
                t = self._tiles[slide_id]
                blurred = t[t["sharpness"] < float(mss)] if mss is not None and "sharpness" in t else t.iloc[:0]
                ink = (mask >= 2).astype(np.float32)[..., None]
                self._qc_inputs[slide_id] = (ink, scale, blurred[["x", "y", "size0"]].to_numpy(np.float64))
            return self._qc_inputs[slide_id]

    def qc_rgba(self, slide_id: str, z: int, x: int, y: int) -> np.ndarray | None:
        """(tile_px, tile_px, 4) uint8 QC tile (ink magenta, blurred tiles blue), or None outside."""
        x0, y0, w0, h0, d = self.pyramid.region(slide_id, z, x, y)
        mask, scale, boxes = self._qc(slide_id)
        if w0 == 0 or h0 == 0:
            return None
        n = self.pyramid.tile_px
        out = np.zeros((n, n, 4), np.uint8)
        for bx, by, bs in boxes:  # blurred tiles first, ink over them
            c0, c1 = int(np.clip((bx - x0) / d, 0, n)), int(np.clip((bx + bs - x0) / d, 0, n))
            r0, r1 = int(np.clip((by - y0) / d, 0, n)), int(np.clip((by + bs - y0) / d, 0, n))
            out[r0:r1, c0:c1] = BLUR_RGBA
        ink = _sample(mask, scale, x0, y0, d, n, order=0)[..., 0] > 0.5
        out[ink] = INK_RGBA
        return out

    def tile(self, layer: str, slide_id: str, z: int, x: int, y: int, *, method: str = "") -> bytes:
        """PNG of an overlay tile (``layer`` "heat" with ``method``, or "qc"), cached; a blank PNG
        outside the slide."""
        from viz.overlay import to_png

        self.pyramid.check(slide_id, z, x, y)
        if layer == "heat":
            self._check_method(slide_id, method)  # before any cache path is built
            key = (slide_id, f"heat-{method}", str(int(z)), f"{int(x)}_{int(y)}.png")

            def make() -> bytes:
                img = self.heat_rgba(slide_id, method, z, x, y)
                return BLANK_PNG if img is None else to_png(img)

        elif layer == "qc":
            key = (slide_id, "qc", str(int(z)), f"{int(x)}_{int(y)}.png")

            def make() -> bytes:
                img = self.qc_rgba(slide_id, z, x, y)
                return BLANK_PNG if img is None else to_png(img)

        else:
            raise TileImageError(f"unknown layer {layer!r}")
        return self.pyramid.cached(key, make)
