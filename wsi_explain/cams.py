"""Gradient CAMs computed together from one layer's activations and gradients.

Each method is a small function of ``A`` (activations) and ``G`` (gradient of the target score
with respect to ``A``), both ``(N, C, h, w)`` float32, returning ``(N, h, w)`` float32 maps after
ReLU and *before* any normalisation, at the layer's resolution. The formulas are those of
pytorch-grad-cam (tested for equality after its ``scale_cam_image`` normalisation).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["FUSED_CAMS", "fused_cams", "normalise_maps", "register_cam"]

CamFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: name -> function(A, G) -> (N, h, w) before ReLU; filled by :func:`register_cam`.
FUSED_CAMS: dict[str, CamFn] = {}
_NEEDS_GRAD: dict[str, bool] = {}


def register_cam(name: str, *, needs_grad: bool = True) -> Callable[[CamFn], CamFn]:
    """Register a fused CAM method (one function of activations and gradients)."""

    def deco(fn: CamFn) -> CamFn:
        FUSED_CAMS[name] = fn
        _NEEDS_GRAD[name] = needs_grad
        return fn

    return deco


def _weighted(weights: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return (weights[:, :, None, None] * A).sum(1)


@register_cam("gradcam")
def _gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return _weighted(G.mean((2, 3)), A)


@register_cam("gradcampp")
def _gradcampp(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    g2 = G * G
    g3 = g2 * G
    sum_a = A.sum((2, 3), keepdim=True)
    aij = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    aij = torch.where(G != 0, aij, torch.zeros_like(aij))
    weights = (G.clamp(min=0) * aij).sum((2, 3))
    return _weighted(weights, A)


@register_cam("xgradcam")
def _xgradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    sum_a = A.sum((2, 3), keepdim=True)
    weights = (G * A / (sum_a + 1e-7)).sum((2, 3))
    return _weighted(weights, A)


@register_cam("hirescam")
def _hirescam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return (G * A).sum(1)


@register_cam("layercam")
def _layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return (G.clamp(min=0) * A).sum(1)


@register_cam("eigencam", needs_grad=False)
def _eigencam(A: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """First principal component of the activations (pytorch-grad-cam's ``get_2d_projection``).

    Computed with NumPy's SVD on float32, as the reference does, so that the arbitrary sign of
    the singular vector is the same as pytorch-grad-cam's.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    a = A.detach().float().cpu().numpy()
    a = np.nan_to_num(a, nan=0.0)
    n, c, h, w = a.shape
    out = np.empty((n, h, w), np.float32)

    def one(i: int) -> None:
        flat = a[i].reshape(c, -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        out[i] = (flat @ vt[0]).reshape(h, w)

    # many small SVDs: one BLAS thread each (BLAS threads only spin here), tiles spread over the
    # cores with threads (LAPACK releases the GIL); the model's threads are idle at this point
    with threadpool_limits(limits=1, user_api="blas"):
        workers = min(os.cpu_count() or 1, n)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(n)))
        else:
            for i in range(n):
                one(i)
    return torch.from_numpy(out).to(A.device)


def needs_grad(methods: list[str] | tuple[str, ...]) -> bool:
    return any(_NEEDS_GRAD[m] for m in methods)


def fused_cams(A: torch.Tensor, G: torch.Tensor | None, methods: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """All requested CAMs from one layer's activations and gradients.

    Parameters
    ----------
    A : (N, C, h, w) tensor
        Target-layer activations (float32 is used whatever the input dtype).
    G : (N, C, h, w) tensor or None
        Gradient of each sample's target score with respect to ``A`` (None if no method needs it).
    methods : names in :data:`FUSED_CAMS`

    Returns
    -------
    dict name -> (N, h, w) float32 tensor, ReLU applied, unnormalised.
    """
    A = A.float()
    G = G.float() if G is not None else None
    out = {}
    for m in methods:
        if m not in FUSED_CAMS:
            raise ValueError(f"unknown CAM method {m!r}; fused methods: {sorted(FUSED_CAMS)}")
        out[m] = FUSED_CAMS[m](A, G).clamp(min=0)
    return out


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max normalisation to [0, 1] as pytorch-grad-cam's ``scale_cam_image``
    (``(m - min) / (max - min + 1e-7)``); ``maps`` is (N, h, w) and is not modified."""
    m = np.asarray(maps, dtype=np.float32)
    lo = m.min(axis=(1, 2), keepdims=True)
    m = m - lo
    return m / (1e-7 + m.max(axis=(1, 2), keepdims=True))
