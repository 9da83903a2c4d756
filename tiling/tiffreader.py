"""Reading a tiled TIFF's pixels straight from its tiles: tifffile finds the tiles, imagecodecs
(libjpeg-turbo for JPEG) decodes them, and OpenSlide keeps the metadata.

OpenSlide decodes the same JPEG tiles with the same library, then paints them through cairo into an
ARGB buffer that Python converts back to RGB: 1.4-1.9 ms of the 3.0-3.5 ms it takes per 224 px tile
on the project's CPU machine (benchmarks/RESULTS.md). Here a region is copied out of the decoded
tiles, which are kept in a small cache, since neighbouring grid tiles share TIFF tiles. The pixels
are the same as OpenSlide's (tested: equal on real Aperio and generated slides, white outside the
image); regions that do not fall on whole pixels of their level are read by OpenSlide.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import SlideOpenError, TileReadError
from .readers import OpenSlideReader

__all__ = ["TiffTileReader", "tiff_levels"]

logger = logging.getLogger(__name__)

# TIFF compressions decoded here (others, JPEG 2000 among them, stay with OpenSlide)
_COMPRESSIONS = {1: "none", 5: "LZW", 7: "JPEG", 8: "deflate", 32946: "deflate"}
_SUFFIXES = {".tif", ".tiff", ".svs"}


def tiff_levels(path: str | Path, level_dimensions) -> list[int] | None:
    """The TIFF page holding each pyramid level, or None when this reader cannot read the file.

    Parameters
    ----------
    path : slide file.
    level_dimensions : sequence of (w, h), OpenSlide's levels.

    Returns
    -------
    list of page indices (one per level), or None: not a TIFF, a level that is not a tiled, 8-bit
    RGB page in one of the compressions above, or a file tifffile cannot parse.
    """
    import tifffile

    if Path(path).suffix.lower() not in _SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            found = []
            for w, h in level_dimensions:
                match = [
                    i
                    for i, p in enumerate(pages)
                    if p.is_tiled
                    and p.shape[:2] == (h, w)
                    and p.compression in _COMPRESSIONS
                    and p.samplesperpixel == 3
                    and p.bitspersample == 8
                    and p.planarconfig == 1
                    and (p.photometric == 2 or (p.photometric == 6 and p.compression == 7))  # RGB; YCbCr in JPEG
                    and p.imagedepth == 1
                ]
                if not match:
                    return None
                found.append(match[0])
            return found
    except Exception as exc:  # any parse failure: OpenSlide reads the file instead
        logger.debug("%s: not read directly (%s: %s)", path, type(exc).__name__, exc)
        return None


class TiffTileReader:
    """A tiled TIFF (generic pyramidal TIFF, Aperio SVS with JPEG tiles) read tile by tile.

    Same interface and pixels as :class:`~tiling.readers.OpenSlideReader`, whose metadata
    (``info``), associated images and reads of regions off the level's pixel grid it uses. Unlike an
    OpenSlide handle it is not thread-safe (one file position, one cache): one reader per thread, as
    the extraction's readers and the QC's threads have (a pickled copy re-opens the file).

    Parameters
    ----------
    path : str or Path
    mpp : float, optional
        Level-0 µm per pixel override.
    cache_mb : float
        Decoded tiles kept (least recently used dropped first); 32 MB hold 42 tiles of 512 px.
    openslide : OpenSlideReader, optional
        The file's OpenSlide reader when the caller already opened it (then owned by this reader).

    Raises
    ------
    SlideNotFoundError, SlideOpenError
        As OpenSlideReader; SlideOpenError also when a level is not a tiled page this reader decodes
        (:func:`tiff_levels`; :func:`~tiling.readers.open_slide` then uses OpenSlide).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        mpp: float | None = None,
        cache_mb: float = 32.0,
        openslide: OpenSlideReader | None = None,
    ) -> None:
        self._path = Path(path)
        self._mpp = mpp
        self._cache_mb = cache_mb
        self._os = openslide if openslide is not None else OpenSlideReader(path, mpp=mpp)
        self.info = self._os.info
        pages = tiff_levels(self._path, self.info.level_dimensions)
        if pages is None:
            if openslide is None:  # a handle given by the caller stays the caller's
                self._os.close()
            raise SlideOpenError(self._path, "not a tiled 8-bit RGB TIFF with JPEG, deflate, LZW or no compression")
        self._open_tiff(pages)

    def _open_tiff(self, pages: list[int]) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(self._path)
        self._pages = [self._tif.pages[i] for i in pages]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    # pickling: a worker process re-opens the file by path
    def __getstate__(self) -> dict:
        return {"path": self._path, "mpp": self._mpp, "cache_mb": self._cache_mb}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], mpp=state["mpp"], cache_mb=state["cache_mb"])

    @property
    def path(self) -> Path:
        return self._path

    def _tile(self, level: int, index: int, region: tuple = ()) -> np.ndarray | None:
        """Decoded tile ``index`` of ``level`` (th, tw, 3) uint8, None where the file has none."""
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None  # a sparse TIFF's missing tile: transparent in OpenSlide, white here
        fh = self._tif.filehandle
        try:
            fh.seek(offset)
            data = fh.read(count)
            tile = page.decode(data, index, jpegtables=page.jpegtables)[0][0]
        except Exception as exc:  # imagecodecs' and tifffile's errors have no common base
            where = f" at {tuple(region[0])} (level {level}, size {tuple(region[1])})" if region else ""
            raise TileReadError(
                self._path,
                f"failed to decode region{where}: TIFF tile {index} of level {level} ({type(exc).__name__}: {exc})",
            ) from exc
        self._cache[key] = tile
        self._cached_bytes += tile.nbytes
        while self._cached_bytes > self._cache_mb * 1e6 and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return tile

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """An RGB region, as :meth:`tiling.readers.SlideReader.read_region` (white outside the image)."""
        if self._tif is None:
            raise SlideOpenError(self._path, "reader is closed")
        level = int(level)
        d = self.info.level_downsamples[level]
        lx, ly = location[0] / d, location[1] / d
        if not (float(lx).is_integer() and float(ly).is_integer()):
            return self._os.read_region(location, level, size)  # between the level's pixels: OpenSlide's
        x0, y0, w, h = int(lx), int(ly), int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        page = self._pages[level]
        W, H = self.info.level_dimensions[level]
        tw, th = page.tilewidth, page.tilelength
        across = math.ceil(W / tw)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        for r in range(cy0 // th, (cy1 - 1) // th + 1 if cy1 > cy0 else cy0 // th):
            for c in range(cx0 // tw, (cx1 - 1) // tw + 1 if cx1 > cx0 else cx0 // tw):
                tile = self._tile(level, r * across + c, (location, size))
                if tile is None:
                    continue
                # the part of this tile inside both the region and the image, in level pixels
                ax0, ay0 = max(cx0, c * tw), max(cy0, r * th)
                ax1, ay1 = min(cx1, (c + 1) * tw), min(cy1, (r + 1) * th)
                out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = tile[
                    ay0 - r * th : ay1 - r * th, ax0 - c * tw : ax1 - c * tw
                ]
        return out

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.info.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def associated_images(self) -> dict[str, np.ndarray]:
        return self._os.associated_images()

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
            self._cache.clear()
            self._cached_bytes = 0
        self._os.close()

    def __enter__(self) -> TiffTileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TiffTileReader({str(self._path)!r}, levels={self.info.level_count}, mpp={self.info.mpp})"
