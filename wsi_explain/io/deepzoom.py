"""Deep-zoom tiles of the run's slides for the served explorer (``wsi-explain serve``).

One pyramid for the whole cohort: zoom ``z`` (0 = coarsest) shows the slide at a downsample of
``2 ** (zmax - z)`` level-0 pixels per tile pixel, so that at ``zmax`` one tile pixel is one
level-0 pixel. Tile ``(x, y)`` of zoom ``z`` (origin top-left, as WMTS) covers level-0 pixels
``[x, x + 1) * tile_px * 2 ** (zmax - z)`` horizontally (the same vertically); ``zmax`` is the
smallest zoom at which one tile of the coarsest zoom covers the largest slide of the cohort. Tiles
are read from the best pyramid level with OpenSlide (:mod:`tiling.readers`; zooms far coarser
than the slide's coarsest level slice that level when it is small, read once and kept for the last
4 slides), box-reduced (pyramid downsamples are powers of 2), padded white at the slide's right and
bottom edge to a full tile, JPEG-encoded and cached under
``<run>/cache/dz/<version>/<slide>/tissue/<z>/<x>_<y>.jpg``, where ``version`` names the grid and
the run's tile and extraction records (a re-run stage or a larger slide makes a new folder).

Zoom ``zmax + 1`` (level 0 enlarged 2x) is served too, since the browser fetches the children of
the tiles in view ahead of time. Every request is validated before anything is read: the slide
must be one of the cohort (ids come from URLs), ``0 <= z <= zmax + 1`` and ``0 <= x, y < 2 ** z``; anything else raises
:class:`~wsi_explain.io.tile_images.TileImageError` (the server answers 404). Tiles inside the grid
but outside the slide are a blank 1 x 1 transparent PNG (no read, no 404 in the browser's log).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_explain.core.atomic import atomic_write_bytes
from wsi_explain.io.tile_images import SAFE_ID, TileImageError

__all__ = ["DeepZoomSlide", "DeepZoomTiles", "BLANK_PNG", "zmax_for", "MAX_LEVEL_PX"]

#: largest coarsest level (pixels) kept whole in memory for the coarse zooms (4096 x 4096, 50 MB)
MAX_LEVEL_PX = 4096 * 4096

logger = logging.getLogger(__name__)


def _blank_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


#: a 1 x 1 transparent PNG: the answer for grid tiles outside the slide
BLANK_PNG = _blank_png()


def zmax_for(width: int, height: int, tile_px: int = 256) -> int:
    """The zoom at which tiles are at level-0 resolution, for a slide of ``width`` x ``height``
    level-0 px: the smallest ``z`` with ``tile_px * 2 ** z >= max(width, height)``."""
    return max(0, math.ceil(math.log2(max(width, height, 1) / tile_px)))


@dataclass(frozen=True)
class DeepZoomSlide:
    """A slide of the pyramid: its file, level-0 size in px and level-0 µm per px (None: unknown)."""

    path: str
    width: int
    height: int
    mpp: float | None = None


class DeepZoomTiles:
    """The cohort's deep-zoom pyramid.

    Parameters
    ----------
    slides : slide_id -> :class:`DeepZoomSlide`.
    cache_dir : folder for the JPEG tile cache (``<run>/cache/dz``), None = no cache; tiles go in a
        subfolder named by :attr:`version`.
    tile_px : tile side in px (256).
    quality : JPEG quality.
    version : what else the tiles depend on (:meth:`from_run`: the run's tile and extraction records).
    """

    def __init__(
        self,
        slides: dict[str, DeepZoomSlide],
        *,
        cache_dir: Path | None = None,
        tile_px: int = 256,
        quality: int = 85,
        version: str = "",
    ) -> None:
        if not slides:
            raise ValueError("a deep-zoom pyramid needs at least one slide")
        self.slides = dict(slides)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.tile_px = int(tile_px)
        self.quality = int(quality)
        self.zmax = max(zmax_for(s.width, s.height, self.tile_px) for s in self.slides.values())
        # the cache's folder says what its tiles depend on: the grid (zmax, tile size, quality) and the
        # run's records (``version``); another grid or a re-run stage uses a new folder
        self.version = hashlib.sha256(json.dumps([self.zmax, self.tile_px, self.quality, version]).encode()).hexdigest()
        self.version = self.version[:12]
        if self.cache_dir is not None:
            self.cache_dir = self.cache_dir / self.version
        self._readers: dict[str, object] = {}
        self._levels: dict[str, np.ndarray] = {}  # coarsest levels, least recently used first
        self._level_locks: dict[str, threading.Lock] = {}
        self.keep_levels = 4
        self._lock = threading.Lock()
        self._local = threading.local()  # each serving thread's direct TIFF decoders (not thread-safe)

    @classmethod
    def from_run(cls, run_path: str | Path, slide_ids: list[str], **kw) -> DeepZoomTiles:
        """The pyramid of a run's slides (paths and sizes from each slide's tile table)."""
        from wsi_explain.io.tile_table import read_tile_table

        run_path = Path(run_path).resolve()
        slides = {}
        for sid in slide_ids:
            _, m = read_tile_table(run_path / "slides" / sid / "tiles.parquet")
            w, h = m["level0_dimensions"]
            slides[sid] = DeepZoomSlide(str(m["slide_path"]), int(w), int(h), m.get("level0_mpp"))
        stages = json.loads((run_path / "manifest.json").read_text()).get("stages", {})
        ends = {
            st: {sid: (stages.get(st, {}).get("slides", {}).get(sid) or {}).get("end") for sid in slide_ids}
            for st in ("tile", "extract")
        }
        return cls(slides, cache_dir=run_path / "cache" / "dz", version=json.dumps(ends, sort_keys=True), **kw)

    # -- geometry -------------------------------------------------------------------------------
    def downsample(self, z: int) -> float:
        """Level-0 px per tile px at zoom ``z`` (0.5 at ``zmax + 1``)."""
        return 2.0 ** (self.zmax - int(z))

    def check(self, slide_id: str, z: int, x: int, y: int) -> None:
        """Raise :class:`TileImageError` unless the slide is the cohort's and (z, x, y) is in the grid."""
        if not isinstance(slide_id, str) or not SAFE_ID.match(slide_id) or slide_id not in self.slides:
            raise TileImageError(f"unknown slide {slide_id!r}")
        z, x, y = int(z), int(x), int(y)
        if not 0 <= z <= self.zmax + 1:
            raise TileImageError(f"zoom {z} out of range 0..{self.zmax + 1}")
        if not (0 <= x < 2**z and 0 <= y < 2**z):
            raise TileImageError(f"tile ({x}, {y}) out of range at zoom {z}")

    def region(self, slide_id: str, z: int, x: int, y: int) -> tuple[int, int, int, int, float]:
        """Level-0 box of a tile clipped to the slide -> (x0, y0, w0, h0, downsample); w0 or h0 is 0
        when the tile lies outside the slide."""
        self.check(slide_id, z, x, y)
        s, d = self.slides[slide_id], self.downsample(z)
        side = int(self.tile_px * d)
        x0, y0 = int(x) * side, int(y) * side
        return x0, y0, max(0, min(side, s.width - x0)), max(0, min(side, s.height - y0)), d

    # -- tissue tiles ---------------------------------------------------------------------------
    def _reader(self, slide_id: str):
        """The slide's reader, opened once; a slide that cannot be opened (moved, unreadable) raises
        its :class:`tiling.errors.SlideError` on every call without trying again."""
        with self._lock:
            if slide_id not in self._readers:
                from tiling.errors import SlideError
                from tiling.readers import open_slide

                s = self.slides[slide_id]
                try:
                    self._readers[slide_id] = open_slide(s.path, mpp=s.mpp)
                except SlideError as exc:
                    logger.warning("deep zoom: slide %s cannot be shown: %s", slide_id, exc)
                    self._readers[slide_id] = exc
            r = self._readers[slide_id]
        if isinstance(r, Exception):
            raise r
        return r

    def _direct(self, slide_id: str):
        """This thread's direct TIFF decoder of the slide (:class:`tiling.TiffTileReader`: the same
        pixels as OpenSlide in half its time, one per thread), or None for other formats."""
        mine = getattr(self._local, "readers", None)
        if mine is None:
            mine = self._local.readers = {}
        if slide_id not in mine:
            from tiling.errors import SlideError
            from tiling.tiffreader import TiffTileReader

            s = self.slides[slide_id]
            try:
                mine[slide_id] = TiffTileReader(s.path, mpp=s.mpp, cache_mb=8)
            except SlideError:  # another format (or unreadable): the shared OpenSlide reader serves it
                mine[slide_id] = None
        return mine[slide_id]

    def _coarsest(self, slide_id: str) -> np.ndarray:
        """The slide's coarsest pyramid level, whole (at most :data:`MAX_LEVEL_PX` pixels; kept for
        the last few slides asked for; read by one thread while the others wait)."""
        with self._lock:
            slide_lock = self._level_locks.setdefault(slide_id, threading.Lock())
        with slide_lock:
            with self._lock:
                hit = self._levels.pop(slide_id, None)
            if hit is None:
                reader = self._reader(slide_id)
                hit = reader.read_level(reader.info.level_count - 1)
            with self._lock:
                self._levels[slide_id] = hit
                while len(self._levels) > self.keep_levels:
                    self._levels.pop(next(iter(self._levels)))
        return hit

    def problem(self, slide_id: str) -> str | None:
        """Why a slide's tissue cannot be shown (its file moved since the run, or failed to open),
        or None. Cheap: a slide not opened yet is only looked for on disk."""
        with self._lock:
            r = self._readers.get(slide_id)
        path = Path(self.slides[slide_id].path)
        if isinstance(r, Exception) or (r is None and not path.is_file()):
            why = r if isinstance(r, Exception) else f"{path}: no such file"
            return f"The slide's file cannot be read ({why}); its tissue and overlays cannot be shown here."
        return None

    def tissue_rgb(self, slide_id: str, z: int, x: int, y: int) -> np.ndarray | None:
        """(tile_px, tile_px, 3) uint8 RGB of a tile (white beyond the slide's edge), or None
        outside the slide."""
        from PIL import Image

        x0, y0, w0, h0, d = self.region(slide_id, z, x, y)
        if w0 == 0 or h0 == 0:
            return None
        reader = self._reader(slide_id)
        info = reader.info
        # the coarsest level at most d level-0 px per px (OpenSlide's get_best_level_for_downsample)
        level = max(i for i, ds in enumerate(info.level_downsamples) if ds <= d * 1.0001 or i == 0)
        ds = info.level_downsamples[level]
        rw, rh = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
        lw, lh = info.level_dimensions[level]
        img = None
        if level == info.level_count - 1 and d >= 4 * ds and lw * lh <= MAX_LEVEL_PX:  # far coarser than
            whole = self._coarsest(slide_id)  # the pyramid: slice its small coarsest level, read once
            c0, r0 = int(x0 / ds), int(y0 / ds)
            img = np.ascontiguousarray(whole[r0 : r0 + rh, c0 : c0 + rw])
            rw, rh = img.shape[1], img.shape[0]
        if img is None or img.size == 0:
            img = (self._direct(slide_id) or reader).read_region((x0, y0), level, (rw, rh))
        ow, oh = max(1, round(w0 / d)), max(1, round(h0 / d))
        if (rw, rh) != (ow, oh):
            im = Image.fromarray(img)
            factor = d / ds
            if factor >= 2 and float(factor).is_integer():  # pyramid levels are powers of 2: box-reduce
                im = im.reduce(int(factor))
            if im.size != (ow, oh):
                im = im.resize((ow, oh), Image.BILINEAR)
            img = np.asarray(im)
        out = np.full((self.tile_px, self.tile_px, 3), 255, np.uint8)
        out[:oh, :ow] = img[:oh, :ow]
        return out

    def cached(self, key: tuple[str, ...], make) -> bytes:
        path = self.cache_dir.joinpath(*key) if self.cache_dir is not None else None
        if path is not None and path.exists():
            return path.read_bytes()
        data = make()
        if path is not None and data is not BLANK_PNG:
            atomic_write_bytes(path, data)
        return data

    def tissue(self, slide_id: str, z: int, x: int, y: int) -> bytes:
        """JPEG of a tissue tile (or :data:`BLANK_PNG` outside the slide), cached."""
        from viz.overlay import to_jpeg

        self.check(slide_id, z, x, y)

        def make() -> bytes:
            rgb = self.tissue_rgb(slide_id, z, x, y)
            return BLANK_PNG if rgb is None else to_jpeg(rgb, quality=self.quality)

        return self.cached((slide_id, "tissue", str(int(z)), f"{int(x)}_{int(y)}.jpg"), make)

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                if not isinstance(r, Exception):
                    r.close()
            self._readers.clear()
