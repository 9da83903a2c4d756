"""Tile images for galleries and reports: cut from the slide on demand, overlaid with a map,
cached as PNG under ``<run>/cache/tiles/`` (never served or written outside the run folder)."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_explain.core.atomic import atomic_write_bytes

__all__ = ["TileImages", "TileImageError", "SAFE_ID"]

logger = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class TileImageError(LookupError):
    """Unknown slide, tile or method (the server answers 404)."""


class TileImages:
    """PNG images of the cohort's tiles.

    Parameters
    ----------
    run_path : Path of a clustered run.
    cache : bool
        Keep the PNGs under ``<run>/cache/tiles/<slide>/``.
    """

    def __init__(self, run_path: str | Path, *, cache: bool = True) -> None:
        self.run_path = Path(run_path).resolve()
        self.cache = cache
        t = pd.read_parquet(self.run_path / "cohort" / "tiles.parquet", columns=["slide_id", "tile_id"])
        self._tiles = {sid: set(g["tile_id"].astype(int)) for sid, g in t.groupby("slide_id")}
        self._slides: dict[str, tuple] = {}
        self._lock = threading.Lock()

    @property
    def slide_ids(self) -> list[str]:
        return sorted(self._tiles)

    def methods(self, slide_id: str) -> list[str]:
        from wsi_explain.io.features import stored_methods

        return stored_methods(self._slide(slide_id)[2])

    def check(self, slide_id: str, tile_id: int) -> None:
        """Raise :class:`TileImageError` unless the tile is in the cohort (ids come from URLs)."""
        if not isinstance(slide_id, str) or not SAFE_ID.match(slide_id) or slide_id not in self._tiles:
            raise TileImageError(f"unknown slide {slide_id!r}")
        if int(tile_id) not in self._tiles[slide_id]:
            raise TileImageError(f"slide {slide_id}: unknown tile {tile_id}")

    def _slide(self, slide_id: str):
        with self._lock:
            if slide_id not in self._slides:
                from wsi_explain.io.features import open_store
                from wsi_explain.io.loader import TileDataset
                from wsi_explain.io.tile_table import read_tile_table

                sdir = self.run_path / "slides" / slide_id
                tiles, meta = read_tile_table(sdir / "tiles.parquet")
                ds = TileDataset(meta["slide_path"], tiles, mpp=meta.get("level0_mpp"))
                self._slides[slide_id] = (tiles, ds, open_store(sdir / "features.zarr"))
            return self._slides[slide_id]

    def tile(self, slide_id: str, tile_id: int) -> np.ndarray:
        """(tile_px, tile_px, 3) uint8, read from the slide."""
        self.check(slide_id, tile_id)
        _, ds, _ = self._slide(slide_id)
        _, img, ok, err = ds[int(tile_id)]
        if not ok:
            raise TileImageError(f"slide {slide_id} tile {tile_id}: {err}")
        return np.asarray(img)

    def map(self, slide_id: str, tile_id: int, method: str) -> np.ndarray | None:
        """The stored map of a method for a tile (raw, at its stored resolution), or None."""
        from wsi_explain.io.features import read_maps, stored_methods

        _, _, g = self._slide(slide_id)
        if method not in stored_methods(g):
            return None
        have, maps = read_maps(g, method, np.array([int(tile_id)]))
        return maps[0] if have[0] else None

    def png(self, slide_id: str, tile_id: int, *, method: str = "none", size: int = 128, fmt: str = "png") -> bytes:
        """PNG (or ``fmt="jpeg"``) of a tile: plain (``method="none"``), with one method's overlay,
        or ``"all"``: the tile and every stored map side by side (at the tile's own size when
        ``size`` is 0)."""
        from viz.overlay import cam_overlay, tile_strip, to_jpeg, to_png

        self.check(slide_id, tile_id)
        if method != "none" and method != "all" and (not SAFE_ID.match(method) or method not in self.methods(slide_id)):
            raise TileImageError(f"unknown method {method!r}")
        size = int(size)
        if not 0 <= size <= 1024:
            raise TileImageError(f"size {size} out of range")
        if fmt not in ("png", "jpeg"):
            raise TileImageError(f"unknown image format {fmt!r}")
        ext = "png" if fmt == "png" else "jpg"
        cached = self.run_path / "cache" / "tiles" / slide_id / f"{int(tile_id)}_{method}_{size}.{ext}"
        if self.cache and cached.exists():
            return cached.read_bytes()
        img = self.tile(slide_id, tile_id)
        if method == "all":
            maps = {m: mp for m in self.methods(slide_id) if (mp := self.map(slide_id, tile_id, m)) is not None}
            out = tile_strip(img, maps, size=size or None)
        else:
            mp = self.map(slide_id, tile_id, method) if method != "none" else None
            out = cam_overlay(img, mp) if mp is not None else img
            if size and size != out.shape[0]:
                from PIL import Image

                out = np.asarray(Image.fromarray(out).resize((size, size), Image.BILINEAR))
        data = to_png(out) if fmt == "png" else to_jpeg(out)
        if self.cache:
            atomic_write_bytes(cached, data)
        return data
