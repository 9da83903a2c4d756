"""Write pyramidal TIFF slides that OpenSlide reads (for tests and the demo).

Each pyramid level is its own top-level tiled page: OpenSlide does not see levels
stored as SubIFDs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_pyramidal_tiff", "write_svs", "write_tiled_tiff"]


def _pyramid(image: np.ndarray, min_size: int, factor: int = 2):
    from skimage.transform import downscale_local_mean

    level = image
    yield level
    while min(level.shape[0], level.shape[1]) // factor >= min_size:
        level = np.clip(np.rint(downscale_local_mean(level, (factor, factor, 1))), 0, 255).astype(np.uint8)
        yield level


def _write(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float | None,
    tile: int,
    compression: str,
    quality: int,
    min_level_size: int,
    factor: int,
    description: str | None,
) -> Path:
    import tifffile

    image = np.ascontiguousarray(np.asarray(image)[..., :3])
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comp = None if compression in (None, "none") else compression
    comp_args = {"compression": comp}
    if comp == "jpeg":
        comp_args["compressionargs"] = {"level": quality}
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(_pyramid(image, min_level_size, factor)):
            kwargs = {}
            if mpp is not None:
                d = image.shape[1] / level.shape[1]
                # pixels per centimetre
                res = 1e4 / (mpp * d)
                kwargs["resolution"] = (res, res)
                kwargs["resolutionunit"] = "CENTIMETER"
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                description=description if i == 0 and description else None,
                metadata=None,
                subfiletype=0 if i == 0 else 1,
                **comp_args,
                **kwargs,
            )
    return path


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    min_level_size: int = 256,
    factor: int = 2,
) -> Path:
    """Write a generic pyramidal TIFF (OpenSlide vendor ``generic-tiff``).

    Parameters
    ----------
    path : str or Path
        Output ``.tif`` file.
    image : (H, W, 3) uint8
        Level-0 RGB image.
    mpp : float or None
        Level-0 µm per pixel, stored in the resolution tags (OpenSlide reports it as
        ``openslide.mpp-x``). None writes no resolution: the slide then has no mpp.
    tile : int
        Tile edge in pixels (multiple of 16).
    compression : {"jpeg", "deflate", "none"}
    quality : int
        JPEG quality.
    min_level_size : int
        Levels are added (each ``factor`` times smaller) while the short side stays at least this.

    Returns
    -------
    Path of the written file.
    """
    return _write(
        Path(path),
        image,
        mpp=mpp,
        tile=tile,
        compression=compression,
        quality=quality,
        min_level_size=min_level_size,
        factor=factor,
        description=None,
    )


def write_svs(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float = 0.5,
    magnification: float = 20.0,
    tile: int = 256,
    quality: int = 90,
    min_level_size: int = 256,
    factor: int = 4,
) -> Path:
    """Write an Aperio-style SVS file (OpenSlide vendor ``aperio``) with mpp and magnification.

    Parameters are as for :func:`write_pyramidal_tiff`; ``magnification`` becomes ``AppMag``
    (``openslide.objective-power``).
    """
    h, w = image.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        f"|AppMag = {magnification:g}|MPP = {mpp:.6f}|Filename = {Path(path).stem}"
    )
    return _write(
        Path(path),
        image,
        mpp=None,
        tile=tile,
        compression="jpeg",
        quality=quality,
        min_level_size=min_level_size,
        factor=factor,
        description=desc,
    )


def write_tiled_tiff(
    path: str | Path,
    size: tuple[int, int],
    render: callable,
    *,
    mpp: float = 0.25,
    tile: int = 512,
    quality: int = 85,
    min_level_size: int = 512,
    factor: int = 4,
) -> Path:
    """Write a large generic pyramidal TIFF tile by tile, never holding a level in memory.

    Parameters
    ----------
    path : str or Path
    size : (H, W)
        Level-0 size in pixels.
    render : callable ``render(downsample, y0, x0, h, w) -> (h, w, 3) uint8``
        Draws the region of level 0 starting at level-0 pixel ``(y0, x0)``, at ``downsample``
        level-0 pixels per output pixel. Each level is rendered directly (not downsampled from
        level 0), so a 40,000 x 30,000 slide costs about 1.3x its level 0.
    mpp : float
        Level-0 µm per pixel.
    tile, quality, min_level_size, factor :
        As for :func:`write_pyramidal_tiff`.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    H, W = size
    levels = [1]
    while min(H // (levels[-1] * factor), W // (levels[-1] * factor)) >= min_level_size:
        levels.append(levels[-1] * factor)

    def tiles(d: int, h: int, w: int):
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                th, tw = min(tile, h - ty), min(tile, w - tx)
                out = np.full((tile, tile, 3), 255, np.uint8)
                out[:th, :tw] = render(d, ty * d, tx * d, th, tw)
                yield out

    with tifffile.TiffWriter(path, bigtiff=H * W * 3 > 2**31) as tif:
        for i, d in enumerate(levels):
            h, w = H // d, W // d
            res = 1e4 / (mpp * d)
            tif.write(
                tiles(d, h, w),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path
