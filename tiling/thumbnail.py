"""A slide thumbnail with the tile grid and tissue outline drawn on it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .tissue import TissueMask

__all__ = ["grid_thumbnail"]


def grid_thumbnail(
    tissue: TissueMask, tiles: pd.DataFrame, *, colour=(0, 160, 0), outline=(30, 30, 220), ink_colour=(255, 0, 255)
) -> np.ndarray:
    """Draw the tiles' boxes, the tissue outline and the pen-ink mask on the tissue mask's image.

    Ink is tinted half-way to ``ink_colour`` and outlined in it.

    Parameters
    ----------
    tissue : TissueMask
        Its ``image`` (at ``tissue.scale`` level-0 px per pixel) is the background; not modified.
    tiles : DataFrame with x, y, size0 in level-0 pixels

    Returns
    -------
    (h, w, 3) uint8 RGB image.
    """
    from scipy import ndimage as ndi
    from skimage.draw import rectangle_perimeter

    img = tissue.image.copy()
    edge = tissue.mask & ~ndi.binary_erosion(tissue.mask)
    img[edge] = outline
    if tissue.ink.any():
        ink = tissue.ink
        img[ink] = ((img[ink].astype(np.uint16) + np.asarray(ink_colour, np.uint16)) // 2).astype(np.uint8)
        img[ink & ~ndi.binary_erosion(ink)] = ink_colour
    h, w = img.shape[:2]
    s = tissue.scale
    for x, y, size in tiles[["x", "y", "size0"]].to_numpy():
        r0, c0 = int(y / s), int(x / s)
        r1, c1 = min(int((y + size) / s), h - 1), min(int((x + size) / s), w - 1)
        if r1 <= r0 or c1 <= c0:
            continue
        rr, cc = rectangle_perimeter((r0, c0), end=(r1, c1), shape=img.shape[:2], clip=True)
        img[rr, cc] = colour
    return img
