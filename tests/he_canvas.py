"""Canvases of real H&E for the ink tests: a real field mirror-tiled into a tissue blob on glass."""

from __future__ import annotations

import numpy as np

#: glass as CMU-1's scanner shows it (median of its bright background)
GLASS = (246, 243, 243)


def mirror_canvas(
    field: np.ndarray, field_mpp: float, *, mpp: float, size_mm=(8.0, 10.0), seed: int = 0, tissue_share: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size_mm`` canvas at ``mpp`` µm/px: ``field`` (real H&E at ``field_mpp``) block-averaged to
    ``mpp``, mirror-tiled, inside an irregular blob on glass.

    Returns the (H, W, 3) uint8 image and the (H, W) bool blob (where the real field shows).
    """
    from scipy import ndimage as ndi
    from skimage.transform import downscale_local_mean

    rng = np.random.default_rng(seed)
    f = max(int(round(mpp / field_mpp)), 1)
    small = downscale_local_mean(np.asarray(field, np.float32)[..., :3], (f, f, 1))
    H, W = int(size_mm[0] * 1000 / mpp), int(size_mm[1] * 1000 / mpp)
    tile = np.concatenate([small, small[::-1]], 0)
    tile = np.concatenate([tile, tile[:, ::-1]], 1)
    big = np.tile(tile, (H // tile.shape[0] + 1, W // tile.shape[1] + 1, 1))[:H, :W]
    yy, xx = np.mgrid[:H, :W]
    noise = ndi.zoom(ndi.gaussian_filter(rng.normal(size=(H // 8 + 1, W // 8 + 1)), 3), 8, order=1)[:H, :W]
    radius = np.sqrt(tissue_share / np.pi) * 1.1
    blob = np.hypot((yy / H - 0.5), (xx / W - 0.5)) / radius + noise * 2.5 < 1
    glass = np.asarray(GLASS, np.float32) + rng.normal(0, 1.5, (H, W, 3))
    img = np.where(blob[..., None], big, glass)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), blob
