"""Reference maps and metric directions: what a faithfulness number is worth.

A deletion AUC of 0.61 means nothing alone; the same metric on a map that knows nothing, on the
same tiles, gives its floor. :func:`reference_maps` makes those maps and :data:`HIGHER_IS_BETTER`
says which way each metric improves, so that a gain (positive = better than the reference) can be
computed per tile and paired over the same tiles.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REFERENCE_METHODS", "HIGHER_IS_BETTER", "reference_maps", "direction"]

#: the reference "methods" the score stage can add
REFERENCE_METHODS = ("random", "uniform")

#: metric name (without the baseline suffix) -> True when higher is better, False when lower is
HIGHER_IS_BETTER = {
    "deletion_auc": False,  # the target probability falls fast when the relevant pixels go first
    "insertion_auc": True,
    "dic_multiply": False,  # Drop in Confidence
    "dic_mask": False,
    "iic_multiply": True,  # Increase in Confidence
    "iic_mask": True,
    "road_morf": False,  # imputing the most relevant pixels lowers the probability
    "road_lerf": True,  # imputing the least relevant pixels keeps it (closer to 0 from below)
    "road_combined": True,
    "infidelity": False,
    "sensitivity": False,
    "pointing_game": True,
    "graded_hit": True,
    "relevance_mass": True,
    "relevance_rank": True,
    "iou": True,
    "coverage": True,
}


def direction(metric: str) -> bool | None:
    """True (higher is better), False (lower is better) or None (no direction) for a metric name,
    with a baseline suffix allowed (``deletion_auc_blur`` -> ``deletion_auc``)."""
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    for name, higher in HIGHER_IS_BETTER.items():
        if metric.startswith(name + "_"):
            return higher
    return None


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
