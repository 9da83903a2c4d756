"""Tissue detection on a low-resolution level of a slide.

Otsu on saturation, with pen ink and pure white/black background removed, then
morphological clean-up and a minimum object size in µm².
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import MissingMppError, NoTissueError
from .readers import SlideReader

__all__ = ["TissueMask", "detect_tissue", "tissue_mask_from_rgb", "choose_level_for_mpp"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and how it maps to level 0.

    Attributes
    ----------
    mask : (h, w) bool
        True on tissue.
    scale : float
        Level-0 pixels per mask pixel (same in x and y).
    mpp : float
        µm per mask pixel.
    level : int
        Pyramid level the mask was computed from.
    image : (h, w, 3) uint8
        The RGB image the mask was computed from (used for thumbnails).
    ink : (h, w) bool
        Pixels recognised as pen ink (excluded from ``mask``).
    """

    mask: np.ndarray
    scale: float
    mpp: float
    level: int
    image: np.ndarray
    ink: np.ndarray

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean())


def choose_level_for_mpp(level_mpps: list[float], target: float) -> int:
    """Index of the coarsest level whose mpp is at or finer than ``target`` (level 0 if none)."""
    best = 0
    for i, m in enumerate(level_mpps):
        if m <= target * 1.001:
            best = i
    return best


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv

    return rgb2hsv(rgb)


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    mpp: float,
    min_object_um2: float = 20_000.0,
    min_hole_um2: float = 5_000.0,
    sat_floor: float = 0.04,
    sat_cap: float = 0.15,
    remove_ink: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and pen-ink masks of an RGB image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
        Low-resolution image (8-32 µm per pixel works best). Not modified.
    mpp : float
        µm per pixel of ``rgb``; sizes below are converted with it.
    min_object_um2 : float
        Connected tissue regions smaller than this (µm²) are dropped.
    min_hole_um2 : float
        Holes smaller than this (µm²) inside tissue are filled.
    sat_floor, sat_cap : float
        The Otsu threshold on saturation is clipped to this range, so a blank slide stays blank
        (floor) and a slide that is all tissue is not split in two (cap).
    remove_ink : bool
        Remove blue/green/black pen ink from the mask.

    Returns
    -------
    tissue : (h, w) bool
    ink : (h, w) bool
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb = np.asarray(rgb)[..., :3]
    hsv = _rgb_to_hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    mx = rgb.max(axis=2)
    white = rgb.min(axis=2) >= 215
    black = mx <= 40
    background = white | black
    candidates = sat[~background]
    if candidates.size and np.ptp(candidates) > 1e-6:
        thr = float(threshold_otsu(candidates))
    else:
        thr = sat_cap
    thr = float(np.clip(thr, sat_floor, sat_cap))
    tissue = (sat > thr) & ~background
    ink = np.zeros_like(tissue)
    if remove_ink:
        # H&E is pink to purple (hue ~0.75-1.0 and 0-0.05). Blue and green ink sit in 0.25-0.70;
        # black/dark ink is very dark and unsaturated compared with stained tissue.
        blue_green = (hue > 0.25) & (hue < 0.70) & (sat > 0.25)
        dark = (val < 0.35) & (sat < 0.5) & ~black
        ink = blue_green | dark
        ink = ndi.binary_dilation(ink, iterations=1)
        tissue &= ~ink
    px_area = mpp * mpp
    tissue = ndi.binary_opening(tissue, structure=np.ones((2, 2), bool))
    tissue = ndi.binary_closing(tissue, structure=np.ones((3, 3), bool))
    min_obj = max(int(round(min_object_um2 / px_area)), 1)
    min_hole = max(int(round(min_hole_um2 / px_area)), 1)
    tissue = remove_small_objects(tissue, max_size=min_obj)
    tissue = remove_small_holes(tissue, max_size=min_hole)
    if remove_ink:
        tissue &= ~ink
    return tissue.astype(bool), ink.astype(bool)


def detect_tissue(
    reader: SlideReader,
    *,
    target_mpp: float = 16.0,
    min_object_um2: float = 20_000.0,
    remove_ink: bool = True,
    max_pixels: int = 16_000_000,
) -> TissueMask:
    """Detect tissue on the pyramid level closest to ``target_mpp`` (µm per pixel).

    The level at or finer than ``target_mpp`` is read and block-averaged down to about
    ``target_mpp`` (so a slide with few levels still gets an 8-32 µm mask).

    Raises
    ------
    MissingMppError
        When the slide has no mpp (pass ``--mpp``).
    NoTissueError
        When nothing is found.
    """
    from skimage.transform import downscale_local_mean

    info = reader.info
    if info.mpp is None:
        raise MissingMppError(info.path, "the slide states no resolution (µm per pixel); pass --mpp")
    level_mpps = [info.level_mpp(i) for i in range(info.level_count)]
    level = choose_level_for_mpp(level_mpps, target_mpp)
    w, h = info.level_dimensions[level]
    if w * h > max_pixels * 16:
        # no coarse level: a single-resolution giant would not fit; use the coarsest level anyway
        logger.warning("%s: no pyramid level near %.1f µm; reading %dx%d pixels", info.path, target_mpp, w, h)
    img = reader.read_level(level)
    scale = info.level_downsamples[level]
    factor = max(int(target_mpp // level_mpps[level]), 1)
    if factor > 1:
        img = np.clip(np.rint(downscale_local_mean(img, (factor, factor, 1))), 0, 255).astype(np.uint8)
        scale *= factor
    mpp = info.mpp * scale
    tissue, ink = tissue_mask_from_rgb(img, mpp=mpp, min_object_um2=min_object_um2, remove_ink=remove_ink)
    if not tissue.any():
        raise NoTissueError(info.path, "no tissue found (blank or out-of-focus slide, or thresholds too strict)")
    logger.debug("%s: tissue %.1f%% at %.2f µm/px (level %d)", info.path, 100 * tissue.mean(), mpp, level)
    return TissueMask(mask=tissue, scale=float(scale), mpp=float(mpp), level=level, image=img, ink=ink)
