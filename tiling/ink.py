"""Pen ink on a low-resolution slide image, from optical density rather than hue.

A pixel is an ink candidate when its optical density is far from every non-negative mixture of
the slide's own haematoxylin and eosin (the residual of the stain decomposition, see
:mod:`tiling.stain`) or when it is dark and grey (black marker, which some stains' planes
contain). Strokes are then found by their size: candidates averaged over a ~50 µm window must
pass a high threshold to seed a stroke, seeds narrower than ``min_width_um`` (a nucleus, a clump
of red cells, a thin fold) are dropped, a stroke grows into neighbouring candidates over a few
pixels only, and each stroke is closed over gaps narrower than itself (where it crosses
haematoxylin-dense tissue and blue ink looks like more haematoxylin).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .stain import FOREGROUND_OD, StainVectors, estimate_stains, glass_level, optical_density

__all__ = ["InkRules", "InkResult", "detect_ink", "ink_score"]


@dataclass(frozen=True)
class InkRules:
    """Thresholds of the ink detector (OD units are ``log10`` optical density).

    Attributes
    ----------
    seed_od : float
        A stroke starts where the window-averaged residual exceeds this.
    grow_od : float
        It grows into pixels whose own residual exceeds this.
    window_um : float
        Edge of the averaging window (µm).
    dark_od, grey_spread : float
        Dark-and-grey rule: mean OD above ``dark_od`` and (max - min) / mean OD below ``grey_spread``.
    min_width_um : float
        Ink components narrower than this (twice their largest inscribed radius) are dropped.
    close_share : float
        Each stroke is closed with a disk of radius ``close_share`` x its width (0 = no closing).
    """

    seed_od: float = 0.10
    grow_od: float = 0.05
    window_um: float = 48.0
    dark_od: float = 0.55
    grey_spread: float = 0.25
    min_width_um: float = 120.0
    close_share: float = 0.5
    max_close_um: float = 250.0

    def __post_init__(self) -> None:
        if not 0 < self.grow_od <= self.seed_od:
            raise ValueError(f"need 0 < grow_od <= seed_od, got {self.grow_od}, {self.seed_od}")
        if self.window_um < 0 or self.min_width_um < 0 or self.close_share < 0:
            raise ValueError("window_um, min_width_um and close_share must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InkResult:
    """Ink on a low-resolution image.

    Attributes
    ----------
    mask : (h, w) bool
        Pen ink (over tissue or glass).
    score : (h, w) float32
        Per-pixel evidence, OD units: the stain residual, raised to ``2 * seed_od`` on dark grey pixels.
    stains : StainVectors
        The slide's H and E vectors used.
    """

    mask: np.ndarray
    score: np.ndarray
    stains: StainVectors


def _channel_stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel min, max and mean over the last axis of an (h, w, 3) array (channel by channel:
    NumPy's reductions over a short last axis are slow)."""
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return np.minimum(np.minimum(r, g), b), np.maximum(np.maximum(r, g), b), (r + g + b) / 3


def ink_score(od: np.ndarray, stains: StainVectors, rules: InkRules = InkRules()) -> np.ndarray:
    """Per-pixel ink evidence (OD units) of an (h, w, 3) OD image: the residual of the stain
    decomposition, raised to ``2 * seed_od`` on dark grey pixels. (h, w) float32."""
    r = stains.residual(od)
    lo, hi, mean = _channel_stats(od)
    grey = (mean > rules.dark_od) & ((hi - lo) < rules.grey_spread * mean)
    return np.where(grey, np.maximum(r, 2 * rules.seed_od), r).astype(np.float32)


def _components(mask: np.ndarray):
    """Label image and, per component, (label, bounding box, its largest inscribed radius in px)."""
    from scipy import ndimage as ndi

    dt = ndi.distance_transform_edt(mask)
    lab, _ = ndi.label(mask)
    comps = []
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is not None:
            comps.append((i, box, float(dt[box][lab[box] == i].max())))
    return lab, comps


def _keep_wide_and_close(mask: np.ndarray, min_width_px: float, share: float, max_px: float) -> np.ndarray:
    """Drop components narrower than ``min_width_px``; close each other one with a disk of radius
    ``share`` x its width (Euclidean distance transforms on the component's box: dilation then
    erosion, no large structuring element)."""
    from scipy import ndimage as ndi

    if not mask.any():
        return mask
    lab, comps = _components(mask)
    out = np.zeros_like(mask)
    for i, box, radius in comps:
        if 2 * radius < min_width_px:
            continue
        comp = lab[box] == i
        out[box] |= comp
        r = min(share * 2 * radius, max_px)
        if r < 1.5:
            continue
        pad = int(np.ceil(r)) + 1  # zero padding, so that the image border does not stop the erosion
        padded = np.pad(comp, pad)
        dilated = ndi.distance_transform_edt(~padded) <= r
        closed = (ndi.distance_transform_edt(dilated) > r)[pad:-pad, pad:-pad]
        out[box] |= closed
    return out


def detect_ink(
    rgb: np.ndarray,
    *,
    mpp: float,
    stains: StainVectors | None = None,
    rules: InkRules = InkRules(),
) -> InkResult:
    """Pen ink of a low-resolution RGB image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
        The image (4-16 µm per pixel is what the defaults are tuned and tested at). Not modified.
    mpp : float
        µm per pixel of ``rgb``.
    stains : StainVectors, optional
        H and E vectors; default: estimated from this image (:func:`tiling.estimate_stains`).
    rules : InkRules

    Returns
    -------
    InkResult
    """
    from scipy import ndimage as ndi
    from skimage.morphology import remove_small_holes

    rgb = np.asarray(rgb)[..., :3]
    if stains is None:
        glass = glass_level(rgb)
        od = optical_density(rgb, glass)
        stains = estimate_stains(od, glass=glass)
    else:
        od = optical_density(rgb, stains.glass)
    score = ink_score(od, stains, rules)
    score = np.where(od.sum(axis=-1) > FOREGROUND_OD / 3, score, 0.0).astype(np.float32)
    k = max(int(round(rules.window_um / mpp)), 1)
    smooth = ndi.uniform_filter(score, size=k, mode="nearest") if k > 1 else score
    grow = score > rules.grow_od
    seeds = _keep_wide_and_close((smooth > rules.seed_od) & grow, rules.min_width_um / mpp, 0.0, 0.0)
    ink = ndi.binary_dilation(seeds, iterations=k // 2 + 2, mask=grow) | seeds
    ink = remove_small_holes(ink, max_size=max(int(20_000 / mpp**2), 1))
    ink = _keep_wide_and_close(ink, 0.0, rules.close_share, rules.max_close_um / mpp)
    return InkResult(mask=ink, score=score, stains=stains)
