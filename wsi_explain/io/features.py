"""Reading ``features.zarr`` and adding attribution maps of other methods to it.

Attributions of methods outside the fused pass (captum, ScoreCAM...) are costly, so they run on
all tiles or on a given subset; they are stored in ``attributions/<method>/`` with
``tile_ids`` (m,) int64 and ``maps`` (m, px, px) float32 (area-averaged from the input size).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["open_store", "read_cams", "attribute_tiles", "add_attributions"]

logger = logging.getLogger(__name__)


def open_store(path: str | Path, mode: str = "r"):
    import zarr

    return zarr.open_group(str(path), mode=mode)


def read_cams(store, method: str, idx: np.ndarray | slice | None = None) -> np.ndarray:
    """Raw (ReLU'd, unnormalised) CAMs ``(m, h, w)`` float32 of tiles ``idx`` (default all)."""
    sel = slice(None) if idx is None else idx
    if isinstance(sel, slice):
        maps = np.asarray(store[f"cams/{method}"][sel], np.float32)
        scale = np.asarray(store[f"cams_scale/{method}"][sel], np.float32)
    else:
        maps = np.asarray(store[f"cams/{method}"].oindex[np.asarray(sel)], np.float32)
        scale = np.asarray(store[f"cams_scale/{method}"].oindex[np.asarray(sel)], np.float32)
    return maps * scale[:, None, None]


def _pool(maps: np.ndarray, px: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if maps.shape[-1] == px and maps.shape[-2] == px:
        return maps.astype(np.float32)
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None], px)[:, 0].numpy()


def attribute_tiles(
    slide_path: str,
    tiles,
    attributor,
    *,
    tile_ids: np.ndarray,
    normalise: Callable,
    batch_size: int = 16,
    out_px: int = 56,
    mpp: float | None = None,
    targets: np.ndarray | None = None,
) -> np.ndarray:
    """Maps of ``attributor`` for the given tiles, read from the slide in batches.

    Parameters
    ----------
    slide_path : str
    tiles : DataFrame (the slide's tile table)
    attributor : :class:`wsi_explain.explain.attributors.Attributor`
    tile_ids : (m,) int
    normalise : callable uint8 (N, H, W, 3) -> normalised float (N, 3, H, W)
    out_px : int
        Stored map size (area-averaged from the input size).
    targets : (m,) int, optional
        Classes to explain (default: the predicted class).

    Returns
    -------
    (m, out_px, out_px) float32.
    """
    from wsi_explain.io.loader import TileDataset

    ds = TileDataset(slide_path, tiles, mpp=mpp)
    out = np.zeros((len(tile_ids), out_px, out_px), np.float32)
    for s in range(0, len(tile_ids), batch_size):
        ids = tile_ids[s : s + batch_size]
        items = [ds[int(i)] for i in ids]
        imgs = np.stack([it[1].numpy() for it in items])
        t = None if targets is None else targets[s : s + batch_size]
        maps = attributor.attribute(normalise(imgs), targets=t)
        out[s : s + len(ids)] = _pool(maps, out_px)
    return out


def add_attributions(store_path: str | Path, method: str, tile_ids: np.ndarray, maps: np.ndarray) -> None:
    """Write (replace) ``attributions/<method>`` in a slide's feature store."""
    g = open_store(store_path, mode="r+")
    name = f"attributions/{method}"
    if name in g:
        del g[name]
    grp = g.require_group(name)
    grp.create_array("tile_ids", data=np.asarray(tile_ids, np.int64))
    grp.create_array("maps", data=np.asarray(maps, np.float32), chunks=(min(len(maps), 64),) + maps.shape[1:])
