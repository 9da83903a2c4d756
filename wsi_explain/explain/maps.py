"""The one place where maps and logits are normalised.

Two min-max rules, both per map over the last two axes of an (N, h, w) array (NumPy or torch;
the result has the input's type and is a new array):

- :func:`scale_maps`, pytorch-grad-cam's ``scale_cam_image`` rule ``(m - min) / (max - min + eps)``:
  used wherever our numbers must equal pytorch-grad-cam's (stored CAMs, ROAD, the perturbation
  metrics). A flat map becomes 0.
- :func:`minmax_maps`, exact ``(m - min) / (max - min)`` with flat maps set to 0: used where maps are
  compared with each other or thresholded (SSIM in the sanity check, IoU in localisation, the
  ensemble's spread of maps).

``viz.overlay`` keeps its own copy of the second rule: ``viz`` is a lower package than
``wsi_explain`` and does not import it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EPS", "scale_maps", "minmax_maps", "softmax"]

EPS = 1e-7


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _bounds(m):
    """Per-map (min, max), shaped to broadcast against ``m`` (N, h, w)."""
    if _is_torch(m):
        flat = m.flatten(1)
        return flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return m.min(axis=(-2, -1), keepdims=True), m.max(axis=(-2, -1), keepdims=True)


def scale_maps(maps, *, eps: float = EPS):
    """Per-map ``(m - min) / (max - min + eps)`` (pytorch-grad-cam's ``scale_cam_image``).

    Parameters
    ----------
    maps : (N, h, w) array or tensor, any float dtype; not modified. NumPy input is computed in
        float32.
    eps : float, keyword-only
        Added to the range; a flat map becomes 0.

    Returns
    -------
    Same type and shape, values in [0, 1).
    """
    m = maps if _is_torch(maps) else np.asarray(maps, dtype=np.float32)
    lo, hi = _bounds(m)
    return (m - lo) / (hi - lo + eps)


def minmax_maps(maps):
    """Per-map ``(m - min) / (max - min)``, exactly in [0, 1]; a flat map becomes 0.

    ``maps`` is (N, h, w) (NumPy or torch; not modified); the result has its type and shape.
    """
    m = maps
    lo, hi = _bounds(m)
    rng = hi - lo
    if _is_torch(m):
        return (m - lo) / rng.where(rng > 0, rng.new_ones(()))
    return (m - lo) / np.where(rng > 0, rng, 1)


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (n, K) -> (n, K), numerically stable; input not modified."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
