"""The per-slide tile table (``slides/<id>/tiles.parquet``, written by the tiling stage) and
geometry read from it.

Columns: see the README's output table; coordinates are level-0 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["read_tile_table", "tissue_cells"]


def read_tile_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a ``tiles.parquet`` and its wsi_explain metadata (slide id, fingerprint, config...)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"wsi_explain", b"{}"))
    return table.to_pandas(), meta


def tissue_cells(
    tiles: pd.DataFrame, tissue_png: Path, scale: float, h: int, w: int, *, code: int | tuple[int, ...] = 1
) -> np.ndarray:
    """(n, h, w) bool: is the centre of each CAM cell on tissue (``code`` 1 in the coded mask,
    ``tiling.MASK_CODES``; 2 = pen ink over tissue, 3 = pen ink on glass)?"""
    from PIL import Image

    coded = np.asarray(Image.open(tissue_png))
    H, W = coded.shape
    fy = (np.arange(h) + 0.5) / h
    fx = (np.arange(w) + 0.5) / w
    x = (
        tiles["x"].to_numpy(np.float64)[:, None, None]
        + fx[None, None, :] * tiles["size0"].to_numpy(np.float64)[:, None, None]
    )
    y = (
        tiles["y"].to_numpy(np.float64)[:, None, None]
        + fy[None, :, None] * tiles["size0"].to_numpy(np.float64)[:, None, None]
    )
    xi = np.clip((x / scale).astype(int), 0, W - 1)
    yi = np.clip((y / scale).astype(int), 0, H - 1)
    xi, yi = np.broadcast_arrays(xi, yi)
    return np.isin(coded[yi, xi], np.atleast_1d(code))
