"""Slide readers: one protocol, an OpenSlide implementation and an in-memory one.

Coordinates are always level-0 pixels; sizes passed to :meth:`SlideReader.read_region`
are in pixels *of the requested level*, as in OpenSlide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import MissingMppError, SlideNotFoundError, SlideOpenError, TileReadError

__all__ = [
    "SlideReader",
    "OpenSlideReader",
    "ArrayReader",
    "open_slide",
    "SlideInfo",
    "PLAIN_IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)

#: Suffixes opened with :class:`ArrayReader` (single-resolution images, not slides).
PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


@dataclass(frozen=True)
class SlideInfo:
    """What a reader knows about its slide.

    Attributes
    ----------
    path : str
        File path, or a name for in-memory images.
    dimensions : tuple of (int, int)
        Level-0 (width, height) in pixels.
    level_dimensions : tuple of (int, int) per level
        (width, height) of each pyramid level in pixels.
    level_downsamples : tuple of float
        Level-0 pixels per level pixel, per level (level 0 is 1.0).
    mpp : float or None
        Level-0 resolution in µm per pixel (x), None when the file does not say.
    objective_power : float or None
        Scanner objective magnification, when the file says.
    vendor : str
        OpenSlide vendor string (``"aperio"``, ``"generic-tiff"``...) or ``"array"``.
    properties : dict
        All slide properties as strings (OpenSlide's property map).
    """

    path: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None
    vendor: str
    properties: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float | None:
        """µm per pixel at ``level`` (None when the slide has no mpp)."""
        if self.mpp is None:
            return None
        return self.mpp * self.level_downsamples[level]


@runtime_checkable
class SlideReader(Protocol):
    """What every slide reader offers. Readers are picklable: a worker process re-opens the file."""

    info: SlideInfo

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an RGB region.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in level-0 pixels.
        level : int
            Pyramid level to read from.
        size : (w, h)
            Size in pixels of ``level``.

        Returns
        -------
        (h, w, 3) uint8 RGB array; areas outside the slide are white.
        """

    def read_level(self, level: int) -> np.ndarray:
        """The whole of ``level`` as an (h, w, 3) uint8 RGB array."""

    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images stored in the file, as RGB arrays."""

    def close(self) -> None:
        """Release the file handle."""


def _float_or_none(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def _rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA on white (transparent = outside the slide)."""
    if rgba[..., 3].min() == 255:  # fully inside the slide: nothing to composite
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    # premultiplied: colour + (255 - alpha) gives white where alpha == 0
    return np.minimum(rgb + (255 - alpha), 255).astype(np.uint8)


class OpenSlideReader:
    """A whole-slide image read with OpenSlide (SVS, generic tiled TIFF, NDPI, MRXS...).

    Parameters
    ----------
    path : str or Path
        Slide file.
    mpp : float, optional
        Level-0 µm per pixel; overrides what the file says (``--mpp`` on the CLI).

    Raises
    ------
    SlideNotFoundError
        The path does not exist.
    SlideOpenError
        OpenSlide cannot open the file.
    """

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        self._path = Path(path)
        self._mpp_override = mpp
        self._slide = None
        self._open()

    def _open(self) -> None:
        import openslide

        if not self._path.exists():
            raise SlideNotFoundError(self._path, "no such file")
        if self._path.is_dir():
            raise SlideOpenError(self._path, "is a folder, not a slide file")
        try:
            self._slide = openslide.OpenSlide(str(self._path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise SlideOpenError(self._path, f"OpenSlide cannot open it ({exc})") from exc
        except Exception as exc:  # OpenSlide wraps some failures in plain errors
            raise SlideOpenError(self._path, f"OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        props = dict(self._slide.properties)
        mpp = self._mpp_override if self._mpp_override is not None else _float_or_none(props.get("openslide.mpp-x"))
        self.info = SlideInfo(
            path=str(self._path),
            dimensions=tuple(self._slide.dimensions),
            level_dimensions=tuple(tuple(d) for d in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=mpp,
            objective_power=_float_or_none(props.get("openslide.objective-power")),
            vendor=props.get("openslide.vendor", "unknown"),
            properties=props,
        )

    # pickling: a worker process re-opens the file by path
    def __getstate__(self) -> dict:
        return {"path": self._path, "mpp": self._mpp_override}

    def __setstate__(self, state: dict) -> None:
        self._path = state["path"]
        self._mpp_override = state["mpp"]
        self._slide = None
        self._open()

    @property
    def path(self) -> Path:
        return self._path

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        if self._slide is None:
            raise SlideOpenError(self._path, "reader is closed")
        try:
            img = self._slide.read_region(
                (int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))
            )
        except openslide.OpenSlideError as exc:
            # an OpenSlide handle fails every read after a failed one: re-open it, so that the next
            # region (QC, extraction and deep zoom read on past a corrupt tile) is read for real
            self._slide.close()
            self._slide = None
            self._open()
            raise TileReadError(
                self._path, f"failed to decode region at {tuple(location)} (level {level}, size {tuple(size)}): {exc}"
            ) from exc
        return _rgba_to_rgb_white(np.asarray(img))

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.info.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def associated_images(self) -> dict[str, np.ndarray]:
        if self._slide is None:
            return {}
        return {k: np.asarray(v.convert("RGB")) for k, v in self._slide.associated_images.items()}

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenSlideReader({str(self._path)!r}, levels={self.info.level_count}, mpp={self.info.mpp})"


class ArrayReader:
    """A slide held in memory as an RGB array, with a pyramid made on the fly.

    Used by tests and for plain PNG/JPEG images, which are not slides.

    Parameters
    ----------
    image : (H, W, 3) uint8 array
        Level-0 image (not copied; not modified).
    mpp : float, optional
        Level-0 µm per pixel.
    downsamples : sequence of int
        Pyramid levels to expose (1 is level 0).
    name : str
        Used as the path in error messages.
    """

    def __init__(
        self,
        image: np.ndarray,
        *,
        mpp: float | None = None,
        downsamples: tuple[int, ...] = (1,),
        name: str = "<array>",
        objective_power: float | None = None,
    ) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise SlideOpenError(name, f"expected an (H, W, 3) uint8 image, got shape {image.shape} {image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise SlideOpenError(name, "image has zero size")
        image = image[..., :3]
        if downsamples[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
            raise ValueError(f"downsamples must start at 1 and increase, got {downsamples}")
        self._levels = [image]
        from skimage.transform import downscale_local_mean

        for d in downsamples[1:]:
            small = downscale_local_mean(image, (d, d, 1))
            self._levels.append(np.clip(np.rint(small), 0, 255).astype(np.uint8))
        h, w = image.shape[:2]
        self.info = SlideInfo(
            path=name,
            dimensions=(w, h),
            level_dimensions=tuple((lv.shape[1], lv.shape[0]) for lv in self._levels),
            level_downsamples=tuple(float(d) for d in downsamples),
            mpp=_float_or_none(mpp),
            objective_power=objective_power,
            vendor="array",
            properties={} if mpp is None else {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)},
        )

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        img = self._levels[level]
        d = self.info.level_downsamples[level]
        x0, y0 = int(np.floor(location[0] / d)), int(np.floor(location[1] / d))
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + w, img.shape[1]), min(y0 + h, img.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
        return out

    def read_level(self, level: int) -> np.ndarray:
        return self._levels[level].copy()

    def associated_images(self) -> dict[str, np.ndarray]:
        return {}

    def close(self) -> None:
        pass


def open_slide(path: str | Path, *, mpp: float | None = None, decoder: str = "openslide") -> SlideReader:
    """Open a slide file with the right reader.

    PNG and JPEG files become an :class:`ArrayReader` (they need ``mpp``, since they carry none);
    everything else is opened with OpenSlide. ``decoder="auto"`` reads the pixels of a tiled TIFF
    (generic pyramidal TIFF, Aperio SVS with JPEG tiles) straight from its tiles
    (:class:`~tiling.tiffreader.TiffTileReader`, same pixels, about half OpenSlide's time per tile)
    and any other file with OpenSlide; ``"tiff"`` requires the direct reader.

    Raises
    ------
    SlideNotFoundError, SlideOpenError
        With the path and the problem in the message.
    """
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(path, "no such file")
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise SlideOpenError(path, f"cannot decode image ({exc})") from exc
        if mpp is None:
            raise MissingMppError(path, "plain images carry no resolution; pass --mpp (µm per pixel)")
        d = [1]
        while min(arr.shape[0], arr.shape[1]) // (d[-1] * 4) >= 64:
            d.append(d[-1] * 4)
        return ArrayReader(arr, mpp=mpp, downsamples=tuple(d), name=str(path))
    if decoder not in ("openslide", "auto", "tiff"):
        raise ValueError(f"decoder must be 'openslide', 'auto' or 'tiff', got {decoder!r}")
    if decoder == "openslide":
        return OpenSlideReader(path, mpp=mpp)
    from .tiffreader import TiffTileReader

    if decoder == "tiff":
        return TiffTileReader(path, mpp=mpp)
    reader = OpenSlideReader(path, mpp=mpp)
    try:
        return TiffTileReader(path, mpp=mpp, openslide=reader)
    except SlideOpenError:  # not a tiled TIFF it decodes: OpenSlide reads the pixels too
        return reader
