"""Gradient CAMs computed together from one layer's activations and gradients.

Each method is a small function of ``A`` (activations) and ``G`` (gradient of the target score
with respect to ``A``), both ``(N, C, h, w)`` float32, returning ``(N, h, w)`` float32 maps after
ReLU and *before* any normalisation, at the layer's resolution. The formulas are those of
pytorch-grad-cam (tested for equality after its ``scale_cam_image`` normalisation).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["FUSED_CAMS", "first_component", "fused_cams", "register_cam", "signed_projection"]

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
    """sum_c weights[n, c] A[n, c]: (N, C), (N, C, h, w) -> (N, h, w), as one batched product."""
    return torch.einsum("nc,nchw->nhw", weights, A)


@register_cam("gradcam")
def _gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return _weighted(G.mean((2, 3)), A)


@register_cam("gradcampp")
def _gradcampp(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    # the reference's weights are sum relu(G) * aij, aij = G^2 / (2 G^2 + sum(A) G^3 + eps) where
    # G != 0: only G > 0 contributes, so with P = relu(G) that is sum P^3 / (2 P^2 + sum(A) P^3 + eps)
    # (zero where P = 0), the same numbers in three fewer passes over the (N, C, h, w) tensors
    p = G.clamp(min=0)
    p2 = p * p
    p3 = p2 * p
    sum_a = A.sum((2, 3), keepdim=True)
    weights = (p3 / (2 * p2 + sum_a * p3 + 1e-6)).sum((2, 3))
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

    The singular vector's sign is arbitrary; pytorch-grad-cam takes whatever NumPy's LAPACK
    (``gesdd``) returns, so we reproduce that LAPACK's arithmetic, not just the subspace: see
    :func:`first_component`. Tiles are spread over the cores with threads, one BLAS thread each.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    a = A.detach().float().cpu().numpy()
    a = np.nan_to_num(a, nan=0.0)
    n, c, h, w = a.shape
    flat = a.reshape(n, c, h * w).transpose(0, 2, 1)  # (n, hw, C): the reference's matrix
    out = np.empty((n, h * w), np.float32)
    if n == 0:
        return torch.from_numpy(out.reshape(n, h, w)).to(A.device)
    workers = min(os.cpu_count() or 1, n)
    bounds = np.linspace(0, n, workers + 1).astype(int)

    def part(k: int) -> None:
        lo, hi = bounds[k], bounds[k + 1]
        out[lo:hi] = first_component(flat[lo:hi])

    # many small factorisations: one BLAS thread each (BLAS threads only spin here), chunks of
    # tiles on the cores with threads (LAPACK releases the GIL); the model's threads are idle now
    with _single_blas_thread():
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(part, range(workers)))
        else:
            part(0)
    return torch.from_numpy(out.reshape(n, h, w)).to(A.device)


@register_cam("eigencam_signed", needs_grad=False)
def _eigencam_signed(A: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """EigenCAM with a sign that does not depend on LAPACK (Seg-Eigen-CAM's rule, pytorch-grad-cam's
    ``get_2d_projection_with_sign_correction``): each tile's projection is negated when its most
    negative value outweighs its most positive one (:func:`signed_projection`).

    Plain ``eigencam`` keeps the reference's arbitrary sign: on real H&E through EfficientNet-Lite0
    that sign is the one this rule rejects on ~16 % of tiles (the ReLU'd map then shows the other
    end of the component), and where no component dominates round-off can flip it
    (benchmarks/RESULTS.md); this variant is free of both.
    """
    return signed_projection(A)


@register_cam("segeigencam")
def _segeigencam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Seg-Eigen-CAM (Chung & Ying 2025, pytorch-grad-cam's ``SegEigenCAM``): the sign-corrected
    first principal component of the gradient-weighted activations ``|G| * A``, built for
    segmentation models (the gradient of the region score localises, the component summarises)."""
    return signed_projection(G.abs() * A)


def signed_projection(A: torch.Tensor) -> torch.Tensor:
    """Each tile's centred (hw, C) matrix projected on its first principal component, the sign
    chosen so that the projection's largest magnitude is positive.

    Parameters
    ----------
    A : (N, C, h, w) float tensor, any device; NaN read as 0, not modified.

    Returns
    -------
    (N, h, w) float32 on ``A``'s device: ``X @ VT[0]`` with ``X`` the centred matrix, negated where
    ``|min| > |max|`` (Seg-Eigen-CAM's Eq. 13), before any ReLU.

    Notes
    -----
    With the sign fixed by the map itself any SVD gives the same map, so it is computed as the top
    eigenvector of each tile's (hw, hw) Gram matrix, batched, in float64 (float32 on MPS): by
    ``torch.linalg.eigh`` on the CPU, by repeated squaring (:func:`top_eigenvector`) on a GPU,
    where ``eigh`` factors matrices larger than 32 x 32 one at a time (7-32x a forward on an H200).
    """
    dtype = torch.float32 if A.device.type == "mps" else torch.float64
    a = A.detach().to(dtype)
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    n, c, h, w = a.shape
    x = a.reshape(n, c, h * w).transpose(1, 2)  # (n, hw, C)
    x = x - x.mean(1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    if a.device.type == "cpu":
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        p = evecs[..., -1] * evals[:, -1:].clamp(min=0).sqrt()  # = S[0] U[:, 0] up to sign
    else:
        v, lam = top_eigenvector(gram)
        p = v * lam[:, None].clamp(min=0).sqrt()
    flip = p.amin(1).abs() > p.amax(1).abs()
    p = torch.where(flip[:, None], -p, p)
    return p.reshape(n, h, w).float()


def top_eigenvector(gram: torch.Tensor, *, squarings: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpair of each symmetric positive semi-definite matrix of a batch, by matrix products
    only (no per-matrix factorisation, no host round trip).

    Parameters
    ----------
    gram : (n, m, m) float tensor, symmetric PSD (any device; float64 advised).
    squarings : int
        ``gram`` is squared this many times, normalised each time, so that it becomes
        ``gram ** (2 ** squarings)``: a rank-one matrix along the top eigenvector up to a relative
        error of ``(lambda_2 / lambda_1) ** (2 ** squarings)`` (16: below 1e-40 at lambda_2 = 0.998 lambda_1).

    Returns
    -------
    v : (n, m), unit top eigenvectors (sign arbitrary), gram's dtype and device.
    lam : (n,), their eigenvalues ``v^T gram v``. An all-zero matrix gives v = 0 and lam = 0.

    Notes
    -----
    Where the top eigenvalue is (nearly) repeated the eigenvector is not defined, and this returns
    some unit vector of the top eigenspace, as ``eigh`` does.
    """
    p = gram
    for _ in range(squarings):
        p = p / p.abs().amax((1, 2), keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        p = p @ p
    # the column of largest norm of the (near) rank-one power is the best-conditioned copy of v
    norms = p.norm(dim=1)  # (n, m), one per column
    col = norms.argmax(1)
    v = torch.gather(p, 2, col[:, None, None].expand(-1, p.shape[1], 1))[..., 0]
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    v = torch.where(norms.amax(1, keepdim=True) > 0, v, torch.zeros_like(v))
    lam = (v[:, None, :] @ gram @ v[:, :, None])[:, 0, 0]
    return v, lam


def first_component(flat: np.ndarray) -> np.ndarray:
    """Projections of centred rows on the first right singular vector, with NumPy's sign.

    Parameters
    ----------
    flat : (n, hw, C) float32
        One matrix per tile: a row per spatial position, a column per channel (not centred).

    Returns
    -------
    (n, hw) float32: ``X @ VT[0]`` where ``X`` is ``flat`` centred over rows and
    ``_, _, VT = np.linalg.svd(X)``, as pytorch-grad-cam computes it.

    Notes
    -----
    ``X @ VT[0] = S[0] U[:, 0]``, and for ``C >= 11/6 hw`` (every CNN's last block: 49 positions,
    512-2048 channels) LAPACK's ``gesdd`` itself factors ``X = L Q`` and takes U and S from the
    SVD of the small (hw, hw) triangle L. We do the same two steps with the same LAPACK, the
    factorisation as ``X.T = Q R`` (``L = R.T``), but without forming Q or VT (the C-wide products
    that made up most of the cost): 2-3x faster per tile than a direct SVD, with the same sign
    (tested against pytorch-grad-cam, tile for tile). Narrower layers take the direct SVD.
    """
    x = flat - flat.mean(axis=1, keepdims=True)
    n, hw, c = x.shape
    if c >= int(hw * 11 / 6):  # gesdd's own test (MNTHR) for its LQ path
        r = np.linalg.qr(x.transpose(0, 2, 1), mode="r")  # (n, hw, hw) upper triangles
        u, s, _ = np.linalg.svd(r.transpose(0, 2, 1))
        return (u[..., 0] * s[:, :1]).astype(np.float32, copy=False)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return (x @ vt[:, 0, :, None])[..., 0].astype(np.float32, copy=False)


_BLAS_CONTROLLER = None


def _single_blas_thread():
    """A context limiting BLAS to one thread (the controller is built once: building one
    inspects every loaded library, ~4 ms, as much as the SVDs of a dozen tiles)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def needs_grad(methods: list[str] | tuple[str, ...]) -> bool:
    return any(_NEEDS_GRAD[m] for m in methods)


def fused_cams(
    A: torch.Tensor, G: torch.Tensor | None, methods: list[str] | tuple[str, ...]
) -> dict[str, torch.Tensor]:
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
