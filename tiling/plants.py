"""Known shortcuts planted into copies of tile images: pen ink, blur and a stain shift.

The audit's self-test plants them into a run's own tiles, correlates them with a synthetic label
and checks that the audit finds them. Each plant changes exactly one thing a real artefact would:

- ``ink``: a semi-transparent marker stroke across the tile (:mod:`tiling.markers`, Beer-Lambert
  dye over the tissue), 0.15-0.4 mm wide or at least a third of the tile, in one of the four
  marker colours;
- ``blur``: a Gaussian blur of ``sigma_um`` µm (out-of-focus scanning);
- ``stain``: the haematoxylin amount scaled by ``h_scale`` and eosin by ``e_scale`` in optical
  density (colour deconvolution with scikit-image's H&E vectors against white glass), as a
  different staining protocol or site would.

Every function takes a (H, W, 3) uint8 tile and returns a new array; the input is not modified.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PLANT_KINDS", "PLANT_VARIABLES", "plant", "plant_ink", "plant_blur", "plant_stain"]

#: the kinds of shortcut that can be planted
PLANT_KINDS = ("ink", "blur", "stain")

#: the tiling QC columns that measure each kind (what the confounder scan should name)
PLANT_VARIABLES: dict[str, tuple[str, ...]] = {
    "ink": ("ink_frac",),
    "blur": ("sharpness",),
    "stain": ("he_p10", "h_p90", "e_p90", "od_h", "od_e"),
}


def plant_ink(tile: np.ndarray, rng: np.random.Generator, *, mpp: float) -> np.ndarray:
    """A marker stroke across the tile.

    Parameters
    ----------
    tile : (H, W, 3) uint8
    rng : numpy Generator (the stroke's path, width, density and colour)
    mpp : float
        µm per pixel of the tile.
    """
    from tiling.markers import MARKER_COLOURS, random_strokes, render_strokes

    H, W = tile.shape[:2]
    side_mm = min(H, W) * mpp / 1000
    width = (max(0.15, side_mm / 3), max(0.4, side_mm / 2))
    colour = str(rng.choice(list(MARKER_COLOURS)))
    strokes = random_strokes(
        rng,
        (H, W),
        mpp=mpp,
        n=1,
        colours=(colour,),
        width_mm=width,
        length_mm=(2 * side_mm, 3 * side_mm),
        density=(0.6, 0.9),
    )
    return render_strokes(tile, strokes)


def plant_blur(tile: np.ndarray, *, sigma_um: float = 4.0, mpp: float) -> np.ndarray:
    """Gaussian blur of ``sigma_um`` µm (at ``mpp`` µm per pixel), channel by channel."""
    from scipy.ndimage import gaussian_filter

    sigma = sigma_um / mpp
    out = gaussian_filter(np.asarray(tile, np.float32)[..., :3], sigma=(sigma, sigma, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def plant_stain(tile: np.ndarray, *, h_scale: float = 1.8, e_scale: float = 0.8) -> np.ndarray:
    """Haematoxylin and eosin amounts scaled in optical density; what is neither (the residual of
    the deconvolution) is kept."""
    from tiling.stain import standard_stains

    st = standard_stains()
    rgb = np.asarray(tile, np.float64)[..., :3]
    od = -np.log10(np.clip(rgb, 1.0, 255.0) / 255.0)
    conc = st.concentrations(od)  # (..., 2)
    shift = conc[..., :1] * (h_scale - 1) * st.h + conc[..., 1:] * (e_scale - 1) * st.e
    out = 255.0 * 10.0 ** -(od + shift)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def plant(kind: str, tile: np.ndarray, rng: np.random.Generator, *, mpp: float) -> np.ndarray:
    """Plant ``kind`` (one of :data:`PLANT_KINDS`) into a copy of ``tile`` (H, W, 3) uint8 at ``mpp`` µm/px."""
    if kind == "ink":
        return plant_ink(tile, rng, mpp=mpp)
    if kind == "blur":
        return plant_blur(tile, mpp=mpp)
    if kind == "stain":
        return plant_stain(tile)
    raise ValueError(f"unknown plant kind {kind!r}; choose from {', '.join(PLANT_KINDS)}")
