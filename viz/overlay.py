"""Attribution overlays on tile images (PNG bytes for galleries, reports and the explorer)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["jet", "cam_overlay", "tile_strip", "to_png", "to_jpeg", "stitch_heatmap"]


def jet(v: np.ndarray) -> np.ndarray:
    """The classic jet colour map of values in [0, 1] -> (..., 3) uint8 (as OpenCV's COLORMAP_JET)."""
    v = np.clip(np.asarray(v, np.float64), 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def cam_overlay(tile: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """A map (h, w) at any resolution over a tile (H, W, 3) uint8: bilinear upsampling, per-map
    min-max normalisation, jet colours blended with weight ``alpha``. Inputs are not modified."""
    from PIL import Image

    cam = np.asarray(cam, np.float32)
    lo, hi = float(np.nanmin(cam)), float(np.nanmax(cam))
    norm = (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)
    up = np.asarray(Image.fromarray(norm.astype(np.float32), mode="F").resize(tile.shape[1::-1], Image.BILINEAR))
    return (tile.astype(np.float32) * (1 - alpha) + jet(up).astype(np.float32) * alpha).round().astype(np.uint8)


def tile_strip(tile: np.ndarray, cams: dict[str, np.ndarray], *, size: int | None = None) -> np.ndarray:
    """The tile and each map's overlay side by side -> (S, S * (1 + len(cams)), 3) uint8."""
    from PIL import Image

    panels = [tile] + [cam_overlay(tile, c) for c in cams.values()]
    if size is not None and size != tile.shape[0]:
        panels = [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in panels]
    return np.concatenate(panels, axis=1)


def to_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def to_jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes (tile photographs compress ~10x better than PNG; used by the static reports)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def stitch_heatmap(
    overview: np.ndarray, scale: float, boxes: np.ndarray, maps: np.ndarray, *, alpha: float = 0.5
) -> np.ndarray:
    """A slide-level heatmap: each tile's map (raw values, one scale for the whole slide: its 99th
    percentile) resized into the tile's footprint over the slide overview.

    Parameters
    ----------
    overview : (H, W, 3) uint8, the slide at ``scale`` level-0 pixels per pixel; not modified.
    boxes : (n, 4) level-0 [x0, y0, x1, y1] of the tiles.
    maps : (n, h, w) raw non-negative maps.

    Returns
    -------
    (H, W, 3) uint8: the overview with the heatmap blended over the tiles.
    """
    from PIL import Image

    H, W = overview.shape[:2]
    heat = np.full((H, W), np.nan, np.float32)
    vmax = float(np.nanpercentile(maps, 99)) if maps.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    for (x0, y0, x1, y1), m in zip(np.asarray(boxes, np.float64) / scale, np.asarray(maps, np.float32)):
        c0, r0 = int(np.floor(x0)), int(np.floor(y0))
        c1, r1 = min(W, max(c0 + 1, int(np.ceil(x1)))), min(H, max(r0 + 1, int(np.ceil(y1))))
        if c0 >= W or r0 >= H or c1 <= 0 or r1 <= 0:
            continue
        patch = np.asarray(Image.fromarray(m, mode="F").resize((c1 - c0, r1 - r0), Image.BILINEAR))
        heat[max(r0, 0) : r1, max(c0, 0) : c1] = patch[max(0, -r0) :, max(0, -c0) :] / vmax
    out = overview[..., :3].astype(np.float32).copy()
    have = np.isfinite(heat)
    out[have] = out[have] * (1 - alpha) + jet(heat[have]).astype(np.float32) * alpha
    return out.round().astype(np.uint8)
