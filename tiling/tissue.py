"""Tissue detection on a low-resolution level of a slide.

Pen ink is found first, from optical density (:mod:`tiling.ink`); tissue is Otsu on saturation
over what is neither ink nor background, then the tissue under ink is filled in from the
nearest tissue around it (tissue under ink is still tissue: a shortcut model was trained on
it), then morphological clean-up and a minimum object size in µm².
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from .errors import MissingMppError, NoTissueError
from .ink import InkRules, detect_ink
from .readers import SlideReader
from .stain import StainVectors, estimate_stains, glass_level, optical_density

__all__ = ["TissueMask", "detect_tissue", "tissue_mask_from_rgb", "choose_level_for_mpp", "MASK_CODES"]

logger = logging.getLogger(__name__)

#: codes of the coded tissue mask (``tissue.png`` of a run): background, tissue, ink over tissue, ink on glass
MASK_CODES = {"background": 0, "tissue": 1, "ink_on_tissue": 2, "ink_on_glass": 3}


@dataclass(frozen=True)
class TissueMask:
    """Tissue and pen-ink masks of a slide at low resolution, and how they map to level 0.

    Attributes
    ----------
    mask : (h, w) bool
        Tissue, including tissue under pen ink (what the grid covers).
    scale : float
        Level-0 pixels per mask pixel (same in x and y).
    mpp : float
        µm per mask pixel.
    level : int
        Pyramid level the mask was computed from.
    image : (h, w, 3) uint8
        The RGB image the mask was computed from (used for thumbnails).
    ink : (h, w) bool
        Pen ink, over tissue or over glass.
    stains : StainVectors
        The slide's H and E vectors (estimated from the tissue at this resolution, or standard).
    """

    mask: np.ndarray
    scale: float
    mpp: float
    level: int
    image: np.ndarray
    ink: np.ndarray
    stains: StainVectors

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def ink_on_tissue_fraction(self) -> float:
        """Share of the tissue that lies under pen ink."""
        return float((self.ink & self.mask).sum() / max(self.mask.sum(), 1))

    def coded(self) -> np.ndarray:
        """(h, w) uint8 with :data:`MASK_CODES`: 0 background, 1 tissue, 2 ink over tissue, 3 ink on glass."""
        return np.where(self.ink, np.where(self.mask, 2, 3), np.where(self.mask, 1, 0)).astype(np.uint8)


def choose_level_for_mpp(level_mpps: list[float], target: float) -> int:
    """Index of the coarsest level whose mpp is at or finer than ``target`` (level 0 if none)."""
    best = 0
    for i, m in enumerate(level_mpps):
        if m <= target * 1.001:
            best = i
    return best


def _min_max(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.minimum(np.minimum(r, g), b), np.maximum(np.maximum(r, g), b)


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    mpp: float,
    min_object_um2: float = 20_000.0,
    min_hole_um2: float = 5_000.0,
    sat_floor: float = 0.04,
    sat_cap: float = 0.15,
    find_ink: bool = True,
    ink_rules: InkRules = InkRules(),
) -> TissueMask:
    """Tissue, pen ink and stain vectors of an RGB image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
        Low-resolution image (4-32 µm per pixel works best). Not modified.
    mpp : float
        µm per pixel of ``rgb``; sizes below are converted with it.
    min_object_um2 : float
        Connected tissue regions smaller than this (µm²) are dropped.
    min_hole_um2 : float
        Holes smaller than this (µm²) inside tissue are filled.
    sat_floor, sat_cap : float
        The Otsu threshold on saturation is clipped to this range, so a blank slide stays blank
        (floor) and a slide that is all tissue is not split in two (cap).
    find_ink : bool
        Look for pen ink (:func:`tiling.detect_ink`). Without it, ink is whatever saturation calls it.
    ink_rules : InkRules

    Returns
    -------
    TissueMask with ``scale=1`` and ``level=0`` (:func:`detect_tissue` sets the slide's).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb = np.ascontiguousarray(np.asarray(rgb)[..., :3])
    glass = glass_level(rgb)
    od = optical_density(rgb, glass)
    stains = estimate_stains(od, glass=glass)
    if find_ink:
        ink = detect_ink(rgb, mpp=mpp, stains=stains, rules=ink_rules).mask
    else:
        ink = np.zeros(rgb.shape[:2], bool)
    # the semi-transparent fringe of a stroke is neither tissue evidence nor background
    fringe = ndi.binary_dilation(ink, iterations=2) if ink.any() else ink
    lo, hi = _min_max(rgb)
    sat = np.where(hi > 0, (hi.astype(np.float32) - lo) / np.maximum(hi, 1), 0.0)  # HSV saturation
    background = (lo >= 215) | (hi <= 40)
    candidates = sat[~background & ~fringe]
    if candidates.size and candidates.max() - candidates.min() > 1e-6:
        thr = float(threshold_otsu(candidates))
    else:
        thr = sat_cap
    thr = float(np.clip(thr, sat_floor, sat_cap))
    visible = (sat > thr) & ~background & ~fringe
    tissue = visible
    if ink.any() and visible.any():
        lumen_px = max(int(round(min(50_000.0, 10 * min_hole_um2) / (mpp * mpp))), 1)
        tissue = visible | (fringe & _tissue_under_ink(od.sum(axis=-1), ink, fringe, visible, lumen_px=lumen_px))
    px_area = mpp * mpp
    tissue = ndi.binary_opening(tissue, structure=np.ones((2, 2), bool))
    tissue = ndi.binary_closing(tissue, structure=np.ones((3, 3), bool))
    tissue = remove_small_objects(tissue, max_size=max(int(round(min_object_um2 / px_area)), 1))
    tissue = remove_small_holes(tissue, max_size=max(int(round(min_hole_um2 / px_area)), 1))
    return TissueMask(
        mask=tissue.astype(bool), scale=1.0, mpp=float(mpp), level=0, image=rgb, ink=ink.astype(bool), stains=stains
    )


def _tissue_under_ink(
    od_sum: np.ndarray,
    ink: np.ndarray,
    fringe: np.ndarray,
    visible: np.ndarray,
    *,
    lumen_px: int,
    tissue_od: float = 0.08,
    glass_share: float = 0.08,
    min_glass_px: int = 20,
) -> np.ndarray:
    """Which pixels of ``fringe`` (ink and its edge) have tissue under them.

    Each pixel first takes the class of the nearest pixel beside the stroke (holes in the tissue
    smaller than ``lumen_px`` count as tissue). Then, in each stroke
    that also runs over glass (at least ``glass_share`` of its pixels have glass as their nearest
    neighbour, so that a stroke over tissue with lumens does not count), the ink pixels are judged
    by their darkness:
    ink adds the same optical density
    over glass and over tissue (Beer-Lambert), so a pixel whose summed OD exceeds the stroke's
    palest tenth (ink on glass, or on a lumen) by ``tissue_od`` has tissue under it. A marker whose
    density varies along the stroke by more than ``tissue_od`` blurs this line.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import remove_small_holes

    # lumens are not glass beside a stroke: fill holes of the tissue (the stroke counting as tissue)
    # smaller than ``lumen_px`` before asking what lies beside each stroke pixel
    beside = remove_small_holes(visible | fringe, max_size=lumen_px) & ~fringe
    _, (iy, ix) = ndi.distance_transform_edt(fringe, return_indices=True)
    under = beside[iy, ix] & fringe
    lab, _ = ndi.label(fringe)
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        stroke = (lab[box] == i) & ink[box]
        glass_side = stroke & ~under[box]
        if glass_side.sum() < max(min_glass_px, glass_share * stroke.sum()):
            continue  # the stroke lies on tissue (lumens aside): its neighbours decide
        core = stroke & ndi.binary_erosion(stroke, iterations=2)  # edge pixels hold only part of the ink
        ref = float(np.percentile(od_sum[box][core if core.any() else stroke], 10))
        sub = under[box]
        sub[stroke] = od_sum[box][stroke] > ref + tissue_od
    return under


def detect_tissue(
    reader: SlideReader,
    *,
    target_mpp: float = 16.0,
    min_object_um2: float = 20_000.0,
    find_ink: bool = True,
    ink_rules: InkRules = InkRules(),
    max_pixels: int = 16_000_000,
) -> TissueMask:
    """Detect tissue and pen ink on the pyramid level closest to ``target_mpp`` (µm per pixel).

    The level at or finer than ``target_mpp`` is read and block-averaged down to about
    ``target_mpp`` (so a slide with few levels still gets an 8-32 µm mask).

    Raises
    ------
    MissingMppError
        When the slide has no mpp (pass ``--mpp``).
    NoTissueError
        When nothing is found, or when pen ink covers the slide and no tissue is left to see.
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
    tm = tissue_mask_from_rgb(img, mpp=mpp, min_object_um2=min_object_um2, find_ink=find_ink, ink_rules=ink_rules)
    tm = replace(tm, scale=float(scale), level=level)
    if not tm.mask.any():
        not_glass = _min_max(img)[0] < 215
        if tm.ink.sum() >= 0.5 * not_glass.sum() > 0:
            raise NoTissueError(
                info.path,
                f"no tissue found: pen ink covers {100 * tm.ink.mean():.0f}% of the slide "
                f"({100 * tm.ink.sum() / not_glass.sum():.0f}% of what is not glass) and no "
                "stained tissue is visible beside it",
            )
        raise NoTissueError(info.path, "no tissue found (blank or out-of-focus slide, or thresholds too strict)")
    logger.debug(
        "%s: tissue %.1f%% (%.1f%% of it under ink) at %.2f µm/px (level %d), stains %s",
        info.path,
        100 * tm.tissue_fraction,
        100 * tm.ink_on_tissue_fraction,
        mpp,
        level,
        tm.stains.source,
    )
    return tm
