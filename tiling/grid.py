"""An mpp-aware tile grid over the tissue of a slide, and reading its tiles.

Frames (see the tile table contract): ``x, y`` are level-0 pixels of the tile's top-left
corner; ``size0`` is the tile's edge in level-0 pixels; the tile is read at pyramid ``level``
as ``read_w x read_h`` pixels of that level and resized to ``tile_px`` at ``mpp`` µm/px.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .errors import GridError, MissingMppError
from .readers import SlideReader
from .tissue import TissueMask, choose_level_for_mpp

__all__ = ["GridSpec", "make_grid", "read_tile", "tile_boxes", "TILE_COLUMNS"]

#: Columns of the tile table, in order (label fractions are appended as ``label_<name>``).
TILE_COLUMNS = ("tile_id", "x", "y", "size0", "level", "read_w", "read_h", "tile_px", "mpp", "tissue_frac", "ink_frac")


@dataclass(frozen=True)
class GridSpec:
    """Validated, frozen grid parameters.

    Parameters
    ----------
    tile_px : int
        Edge of the output tile in pixels (16-4096).
    mpp : float, optional
        Target resolution of the tiles in µm per pixel (0.05-100). Give this or ``magnification``.
    magnification : float, optional
        Target magnification; converted with the convention ``mpp = 10 / magnification``
        (20x = 0.5 µm/px).
    overlap : int
        Overlap between neighbouring tiles in output pixels, ``0 <= overlap < tile_px``.
    min_tissue : float
        Minimum tissue fraction of a tile (0-1) to keep it.
    roi : (x, y, w, h), optional
        Region of interest in level-0 pixels; only tiles entirely inside are kept.
    """

    tile_px: int = 224
    mpp: float | None = 0.5
    magnification: float | None = None
    overlap: int = 0
    min_tissue: float = 0.5
    roi: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tile_px, bool) or not isinstance(self.tile_px, (int, np.integer)):
            raise ValueError(f"tile_px must be an integer, got {self.tile_px!r}")
        if not 16 <= self.tile_px <= 4096:
            raise ValueError(f"tile_px must be between 16 and 4096 pixels, got {self.tile_px}")
        if self.mpp is None and self.magnification is None:
            raise ValueError("give a target mpp or a magnification")
        if self.magnification is not None:
            if not (0.5 <= self.magnification <= 200):
                raise ValueError(f"magnification must be between 0.5x and 200x, got {self.magnification}")
            object.__setattr__(self, "mpp", 10.0 / float(self.magnification))
        if not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and 0.05 <= self.mpp <= 100):
            raise ValueError(f"target mpp must be between 0.05 and 100 µm per pixel, got {self.mpp}")
        if not 0 <= self.overlap < self.tile_px:
            raise ValueError(f"overlap must be in [0, tile_px={self.tile_px}), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be a fraction in [0, 1], got {self.min_tissue}")
        if self.roi is not None:
            roi = tuple(int(v) for v in self.roi)
            if len(roi) != 4 or roi[2] <= 0 or roi[3] <= 0:
                raise ValueError(f"roi must be (x, y, w, h) with positive w and h, got {self.roi}")
            object.__setattr__(self, "roi", roi)

    def to_dict(self) -> dict:
        return asdict(self)


def _level_for(reader: SlideReader, target_mpp: float) -> int:
    info = reader.info
    return choose_level_for_mpp([info.level_mpp(i) for i in range(info.level_count)], target_mpp)


def make_grid(reader: SlideReader, tissue: TissueMask, spec: GridSpec) -> pd.DataFrame:
    """Tiles of the slide whose tissue fraction is at least ``spec.min_tissue``.

    Parameters
    ----------
    reader : SlideReader
        The slide (its mpp must be known).
    tissue : TissueMask
        From :func:`tiling.detect_tissue` on the same slide.
    spec : GridSpec

    Returns
    -------
    DataFrame with :data:`TILE_COLUMNS`; ``x, y, size0`` in level-0 pixels (int64), ``read_w``,
    ``read_h`` in pixels of ``level``, ``mpp`` in µm per output pixel, ``tissue_frac`` and
    ``ink_frac`` (share of the footprint that is pen ink) in [0, 1] (float32). Rows in raster order
    (row-major by y then x); ``tile_id`` is the row index.

    Raises
    ------
    GridError
        When the slide (or ROI) is smaller than one tile.
    """
    info = reader.info
    if info.mpp is None:
        raise MissingMppError(info.path, "the slide states no resolution (µm per pixel); pass --mpp")
    W, H = info.dimensions
    size0_f = spec.tile_px * spec.mpp / info.mpp
    stride0_f = (spec.tile_px - spec.overlap) * spec.mpp / info.mpp
    size0 = int(round(size0_f))
    if size0 < 1:
        raise GridError(info.path, f"target mpp {spec.mpp} is finer than the slide can give at tile_px {spec.tile_px}")
    x_lo, y_lo, x_hi, y_hi = 0, 0, W, H
    if spec.roi is not None:
        rx, ry, rw, rh = spec.roi
        x_lo, y_lo, x_hi, y_hi = max(rx, 0), max(ry, 0), min(rx + rw, W), min(ry + rh, H)
    if x_hi - x_lo < size0 or y_hi - y_lo < size0:
        raise GridError(
            info.path,
            f"the {'ROI' if spec.roi else 'slide'} ({x_hi - x_lo}x{y_hi - y_lo} level-0 px at {info.mpp:.3f} µm) "
            f"is smaller than one tile ({spec.tile_px} px at {spec.mpp:g} µm = {size0} level-0 px)",
        )
    nx = int(math.floor((x_hi - x_lo - size0) / stride0_f)) + 1
    ny = int(math.floor((y_hi - y_lo - size0) / stride0_f)) + 1
    xs = np.rint(x_lo + np.arange(nx) * stride0_f).astype(np.int64)
    ys = np.rint(y_lo + np.arange(ny) * stride0_f).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    frac = _mask_fraction(tissue.mask, tissue.scale, gx, gy, size0)
    keep = frac >= spec.min_tissue if spec.min_tissue > 0 else np.ones_like(frac, bool)
    gx, gy, frac = gx[keep], gy[keep], frac[keep]
    ink = _mask_fraction(tissue.ink, tissue.scale, gx, gy, size0)
    level = _level_for(reader, spec.mpp)
    d = info.level_downsamples[level]
    read = int(round(size0_f / d))
    n = gx.size
    return pd.DataFrame(
        {
            "tile_id": np.arange(n, dtype=np.int64),
            "x": gx,
            "y": gy,
            "size0": np.full(n, size0, np.int64),
            "level": np.full(n, level, np.int32),
            "read_w": np.full(n, read, np.int32),
            "read_h": np.full(n, read, np.int32),
            "tile_px": np.full(n, spec.tile_px, np.int32),
            "mpp": np.full(n, spec.mpp, np.float64),
            "tissue_frac": frac.astype(np.float32),
            "ink_frac": ink.astype(np.float32),
        }
    )


def _mask_fraction(mask: np.ndarray, s: float, xs: np.ndarray, ys: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each tile's footprint covered by ``mask`` (``s`` level-0 px per mask pixel),
    with a summed-area table; footprints are snapped to mask pixels."""
    m = mask.astype(np.int32)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(xs / s).astype(np.int64), 0, m.shape[1])
    y0 = np.clip(np.floor(ys / s).astype(np.int64), 0, m.shape[0])
    x1 = np.clip(np.ceil((xs + size0) / s).astype(np.int64), 0, m.shape[1])
    y1 = np.clip(np.ceil((ys + size0) / s).astype(np.int64), 0, m.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return total / area


def tile_boxes(tiles: pd.DataFrame) -> np.ndarray:
    """Level-0 boxes of the tiles, (n, 4) float64 ``[x0, y0, x1, y1]``."""
    x = tiles["x"].to_numpy(np.float64)
    y = tiles["y"].to_numpy(np.float64)
    s = tiles["size0"].to_numpy(np.float64)
    return np.stack([x, y, x + s, y + s], axis=1)


def read_tile(reader: SlideReader, tile: pd.Series | dict) -> np.ndarray:
    """Read one tile and resize it to ``tile_px``.

    Parameters
    ----------
    reader : SlideReader
    tile : row of the tile table (needs x, y, level, read_w, read_h, tile_px)

    Returns
    -------
    (tile_px, tile_px, 3) uint8 RGB.

    Raises
    ------
    TileReadError
        When the region fails to decode.
    """
    img = reader.read_region(
        (int(tile["x"]), int(tile["y"])), int(tile["level"]), (int(tile["read_w"]), int(tile["read_h"]))
    )
    px = int(tile["tile_px"])
    if img.shape[0] != px or img.shape[1] != px:
        from PIL import Image

        im = Image.fromarray(img)
        k = img.shape[0] // px
        if img.shape[0] == img.shape[1] == k * px:
            img = np.asarray(im.reduce(k))  # integer factor: box filter, fastest
        else:
            img = np.asarray(im.resize((px, px), Image.BILINEAR if img.shape[0] < px else Image.BOX))
    return img
