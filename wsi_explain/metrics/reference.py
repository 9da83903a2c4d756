"""Reference maps and metric directions: what a faithfulness number is worth.

A deletion AUC of 0.61 means nothing alone; the same metric on a map that knows nothing, on the
same tiles, gives its floor. :func:`reference_maps` makes those maps and :data:`HIGHER_IS_BETTER`
says which way each metric improves, so that a gain (positive = better than the reference) can be
computed per tile and paired over the same tiles.
"""

from __future__ import annotations

import numpy as np

from wsi_explain.core.metric_info import HIGHER_IS_BETTER, direction

__all__ = ["REFERENCE_METHODS", "HIGHER_IS_BETTER", "reference_maps", "direction"]

#: the reference "methods" the score stage can add
REFERENCE_METHODS = ("random", "uniform")


def reference_maps(
    kind: str, n: int, size: tuple[int, int], *, seed: int, first: int = 0, cam_grid: int = 7
) -> np.ndarray:
    """(n, H, W) float32 reference maps at the input resolution ``size`` (pixels).

    ``"random"``: seeded standard-normal values on a ``cam_grid`` x ``cam_grid`` grid, upsampled
    bilinearly: as smooth as a CAM of a 32-stride network, but blind to the image. ``"uniform"``: a
    flat map whose ties are broken in a seeded random pixel order, i.e. independent uniform values
    per pixel (a flat map's ties would otherwise follow the raster order of the sort): ordering
    metrics remove scattered pixels. Map ``i`` is drawn from its own generator seeded with
    (``seed``, ``first + i``), so a batch split anywhere gives the same maps.
    """
    import torch
    import torch.nn.functional as F

    rngs = [np.random.default_rng([seed, first + i]) for i in range(n)]
    if kind == "random":
        grid = np.stack([r.standard_normal((1, cam_grid, cam_grid)) for r in rngs]).astype(np.float32)
        grid = torch.from_numpy(grid.reshape(n, 1, cam_grid, cam_grid))
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    if kind == "uniform":
        return np.stack([r.random(tuple(size), dtype=np.float32) for r in rngs]).reshape((n,) + tuple(size))
    raise ValueError(f"unknown reference map {kind!r}; choose from {list(REFERENCE_METHODS)}")
