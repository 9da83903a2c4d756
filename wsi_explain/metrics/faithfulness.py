"""Faithfulness: does removing what the map points at change the prediction?

Plain functions of a model, a batch of normalised inputs ``(N, 3, H, W)``, attribution maps
``(N, h, w)`` (any resolution; resized bilinearly to the input) and the target classes ``(N,)``.
Inputs and maps are never modified. All scores are per input, so a caller aggregates them as it
likes (per cluster, with bootstrap intervals).

- :func:`perturbation_curve` / :func:`curve_auc`: deletion (most relevant pixels replaced first by
  a baseline; a faithful map makes the target probability fall fast, low AUC) and insertion (start
  from the baseline and reveal the most relevant pixels first; high AUC is good), with a blurred
  or a constant baseline (Petsiuk et al., RISE, 2018).
- :func:`confidence_change`: Drop in Confidence and Increase in Confidence (Chattopadhay et al.,
  Grad-CAM++, 2018) as used in the SaliencyCNNAnalysis study, with the image either darkened by the
  heat map or zeroed outside a binary mask thresholded from it.
- :func:`road`: ROAD (Rong et al., 2022), most- and least-relevant first, pytorch-grad-cam's
  definition with a batched multigrid imputation (:mod:`.imputation`) in place of its SciPy LU.
- :func:`infidelity_score`: captum's ``infidelity`` with Gaussian perturbations.
"""

from __future__ import annotations

import numpy as np
import torch

from wsi_explain.explain.maps import scale_maps

from ._common import (
    as_targets,
    as_tensor_maps,
    chunks,
    model_device,
    seeded,
    softmax_outputs,
    stream_probs,
    target_probs,
)

__all__ = ["perturbation_curve", "curve_auc", "make_baseline", "confidence_change", "road", "infidelity_score"]


def make_baseline(inputs: torch.Tensor, kind: str | float = "blur", *, blur_sigma: float | None = None) -> torch.Tensor:
    """The image that replaces removed pixels: ``"blur"`` (Gaussian, sigma = H / 20 px by default),
    ``"constant"`` (0 in normalised space, i.e. the normalisation mean colour) or a float."""
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        return torch.full_like(inputs, float(kind))
    if kind == "constant":
        return torch.zeros_like(inputs)
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        sigma = float(blur_sigma or max(inputs.shape[-1] / 20.0, 0.5))
        k = 2 * int(round(3 * sigma)) + 1
        k = min(k, 2 * (min(inputs.shape[-2:]) // 2) - 1)
        return gaussian_blur(inputs, kernel_size=[k, k], sigma=[sigma, sigma])
    raise ValueError(f"unknown baseline {kind!r}; use 'blur', 'constant' or a number")


def perturbation_curve(
    model,
    inputs: torch.Tensor,
    maps,
    *,
    targets,
    mode: str = "deletion",
    baseline: str | float | torch.Tensor = "blur",
    steps: int = 16,
    batch_size: int = 32,
    clean_probs: np.ndarray | None = None,
    baseline_probs: np.ndarray | None = None,
    regions: torch.Tensor | None = None,
) -> np.ndarray:
    """Target probability as pixels are removed (deletion) or revealed (insertion), most relevant first.

    Parameters
    ----------
    model : callable (N, 3, H, W) -> logits (N, K)
    inputs : (N, 3, H, W) float tensor, normalised.
    maps : (N, h, w) attribution maps (higher = more relevant).
    targets : (N,) int or int
    mode : {"deletion", "insertion"}
    baseline : "blur", "constant", a number or an (N, 3, H, W) tensor
    steps : int
        The pixels are removed in ``steps`` equal groups; ties in the map are broken by pixel order.
    clean_probs, baseline_probs : (N,) float, optional
        The target probability of the inputs and of the baseline images, when the caller already
        has them (they do not depend on the map: one forward per tile serves every method). The
        curve's two ends are then not forwarded again.
    regions : (N, H, W) float tensor, optional
        For a segmentation model (:class:`~wsi_explain.explain.segmentation.RegionProbNet`): the
        region of each input its target probability is read over, fixed from the unperturbed input
        (:func:`~wsi_explain.explain.segmentation.metric_regions`); every perturbed copy of an input
        is read over that input's region.

    Returns
    -------
    (N, steps + 1) float32 probabilities; column 0 is the unperturbed (deletion) or fully
    baseline (insertion) input, column ``steps`` the opposite end. The perturbed inputs are built
    on the model's device batch by batch, steps and tiles together, so every forward is full.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    n, _, h, w = inputs.shape
    t = as_targets(targets, n)
    dev = model_device(model)
    x = inputs.detach().float().to(dev)
    base = baseline.detach().float().to(dev) if isinstance(baseline, torch.Tensor) else make_baseline(x, baseline)
    m = as_tensor_maps(maps, (h, w)).flatten(1)
    order = torch.argsort(-m, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1).contiguous())
    rank = rank.to(dev)
    ks = torch.as_tensor(np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64), device=dev)
    curves = np.full((n, steps + 1), np.nan, np.float32)
    ends = (clean_probs, baseline_probs) if mode == "deletion" else (baseline_probs, clean_probs)
    for col, known in zip((0, steps), ends):
        if known is not None:
            curves[:, col] = np.asarray(known, np.float32).reshape(n)
    todo = [i for i in range(steps + 1) if np.isnan(curves[:, i]).any()]
    step_of = torch.as_tensor(todo, dtype=torch.long).repeat_interleave(n)  # step-major items
    tile_of = torch.arange(n).repeat(len(todo))

    def build(idx: torch.Tensor) -> torch.Tensor:
        j, k = tile_of[idx].to(dev), ks[step_of[idx].to(dev)]
        hit = (rank[j] < k[:, None]).reshape(-1, 1, h, w)
        z = torch.where(hit, base[j], x[j]) if mode == "deletion" else torch.where(hit, x[j], base[j])
        return z if regions is None else (z, regions[tile_of[idx]])

    probs = stream_probs(model, build, len(step_of), t[tile_of], batch_size=batch_size)
    for a, i in enumerate(todo):
        curves[:, i] = probs[a * n : (a + 1) * n]
    return curves


def curve_auc(curves: np.ndarray) -> np.ndarray:
    """Area under each curve ``(N, S + 1)`` with x evenly spaced on [0, 1] (trapezoid) -> (N,)."""
    c = np.asarray(curves, np.float64)
    return np.trapezoid(c, dx=1.0 / (c.shape[1] - 1), axis=1).astype(np.float32)


def _perturb_by_map(x: torch.Tensor, m01: torch.Tensor, how: str, threshold: float, fill) -> torch.Tensor:
    m = m01[:, None].to(x.device)
    if not isinstance(fill, (int, float)):  # one value per channel
        fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if how == "multiply":
        return fill + (x - fill) * m
    if how == "mask":
        return torch.where(m >= threshold, x, torch.zeros_like(x) + fill)
    raise ValueError(f"how must be 'multiply' or 'mask', got {how!r}")


def confidence_change(
    model,
    inputs: torch.Tensor,
    maps,
    *,
    targets,
    how: str = "multiply",
    threshold: float = 0.5,
    fill: float | tuple[float, ...] = 0.0,
    batch_size: int = 32,
    clean_probs: np.ndarray | None = None,
    regions: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Drop and Increase in Confidence when only what the map shows is kept.

    The map is min-max normalised per input to [0, 1]. ``how="multiply"`` darkens the image by
    the heat map (``fill + (x - fill) * map``; ``fill`` is in normalised input space, 0 = the
    normalisation mean, which is pytorch-grad-cam's ``multiply_tensor_with_cam``; pass the
    normalised value of black per channel, ``-mean / std``, to darken to black); ``how="mask"``
    keeps the pixels where the map is at least ``threshold`` and sets the rest to ``fill``.
    ``clean_probs`` (N,): the inputs' target probability when the caller has it (not forwarded again).
    ``regions`` (N, H, W): a segmentation model's region per input (as in :func:`perturbation_curve`).

    Returns
    -------
    dict of (N,) float32: ``score`` (target probability of the input), ``score_perturbed``,
    ``drop`` = max(0, score - perturbed) / score (Average Drop, as a fraction), ``drop_abs`` =
    max(0, score - perturbed), ``increase`` = 1.0 where the perturbed score is higher.
    """
    n, _, h, w = inputs.shape
    t = as_targets(targets, n)
    x = inputs.detach().float().to(model_device(model))  # perturbed where the model runs
    m01 = scale_maps(as_tensor_maps(maps, (h, w)))
    kw = dict(batch_size=batch_size, regions=regions)
    y = target_probs(model, x, t, **kw) if clean_probs is None else np.asarray(clean_probs, np.float32)
    o = target_probs(model, _perturb_by_map(x, m01, how, threshold, fill), t, **kw)
    drop_abs = np.maximum(y - o, 0).astype(np.float32)
    return {
        "score": y,
        "score_perturbed": o,
        "drop": (drop_abs / np.maximum(y, 1e-12)).astype(np.float32),
        "drop_abs": drop_abs,
        "increase": (o > y).astype(np.float32),
    }


#: ROAD on a GPU imputes this many chunks of :data:`CHUNK` inputs in one solve (64 tiles: 512
#: images at four percentiles, about 0.3 GB at 224 px, the solver's work arrays a few times that).
ROAD_GPU_CHUNKS = 8


def road(
    model,
    inputs: torch.Tensor,
    maps,
    *,
    targets,
    percentiles: tuple[int, ...] = (20, 40, 60, 80),
    seed: int = 0,
    batch_size: int = 32,
    noise: float = 0.01,
    clean_probs: np.ndarray | None = None,
    chunks_per_solve: int | None = None,
    regions: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """ROAD (Rong et al., 2022): the change in target probability when pixels are imputed by noisy
    linear imputation, most relevant first (MoRF) and least relevant first (LeRF).

    The same definition as pytorch-grad-cam's ``ROADMostRelevantFirstAverage`` /
    ``ROADLeastRelevantFirstAverage`` with softmax targets (at percentile ``p`` MoRF imputes the
    pixels at or above the map's p-th percentile, LeRF those at or below its (100 - p)-th), and
    the same noise draws (std ``noise``, per chunk of :data:`CHUNK` inputs seeded with ``seed`` + the
    chunk's first index, MoRF then LeRF, percentile by percentile), so the scores equal the
    reference's within the imputation's tolerance (tested). The imputation is
    :func:`~wsi_explain.metrics.imputation.linear_impute`: all percentiles and both orders of a
    chunk in one batched solve on the model's device (fused CPU kernels on CPU) instead of a
    SciPy LU per image. Cost: 1 + 2 x len(percentiles) forwards per input.

    Parameters
    ----------
    model : callable, (B, 3, H, W) -> (B, K) logits.
    inputs : (N, 3, H, W) float tensor, normalised model inputs; not modified.
    maps : (N, h, w) attribution maps, any resolution (resized bilinearly, scaled to [0, 1]).
    targets : int or (N,) ints.
    batch_size : int
        Imputed inputs per forward.
    clean_probs : (N,) float, optional
        The inputs' target probability when the caller has it (then 2 x len(percentiles) forwards).
    chunks_per_solve : int, optional
        Chunks of :data:`CHUNK` inputs imputed in one batched solve (the scores do not depend on
        it): default 1 on CPU, :data:`ROAD_GPU_CHUNKS` on a GPU, where each solve's conjugate-
        gradient loop waits for the device once per iteration.
    regions : (N, H, W) float tensor, optional
        For a segmentation model (:class:`~wsi_explain.explain.segmentation.RegionProbNet`): the
        region of each input its target probability is read over, fixed from the unperturbed input
        (:func:`~wsi_explain.explain.segmentation.metric_regions`); every perturbed copy of an input
        is read over that input's region.

    Returns
    -------
    dict of (N,) float32: ``morf`` (mean change in target probability over the percentiles; more
    negative = more faithful), ``lerf`` (near 0 = faithful) and ``combined`` = (lerf - morf) / 2
    (pytorch-grad-cam's ``ROADCombined``; higher = more faithful).
    """
    from .imputation import linear_impute

    n, c, h, w = inputs.shape
    t = as_targets(targets, n)
    dev = model_device(model)
    x = inputs.detach().float()
    cams = scale_maps(as_tensor_maps(maps, (h, w))).cpu()
    if clean_probs is None:
        base = target_probs(model, x, t, batch_size=batch_size, regions=regions)
    else:
        base = np.asarray(clean_probs)
    k = len(percentiles)
    scores = np.zeros((2, k, n), np.float32)
    # the noise is drawn per chunk of CHUNK inputs (the reference's draws); on a GPU several chunks
    # are imputed in one solve, so that the host waits for the device per group, not per chunk
    parts = chunks(n, 1, None)
    group = chunks_per_solve or (1 if dev.type == "cpu" else ROAD_GPU_CHUNKS)
    for g0 in range(0, len(parts), group):
        sub = parts[g0 : g0 + group]
        removed = [_road_masks(cams[s0:s1], percentiles) for s0, s1, _ in sub]  # (2, k, m, H, W) each
        batch = torch.cat([x[s0:s1].to(dev).repeat(2 * k, 1, 1, 1) for s0, s1, _ in sub])
        rem = torch.cat([r.reshape(-1, h, w) for r in removed])
        imputed = linear_impute(batch, rem.to(dev))
        draws = [_road_noise(r.reshape(-1, h * w), c, seed + s0, noise) for r, (s0, _, _) in zip(removed, sub)]
        imputed += torch.cat(draws).view_as(imputed).to(dev)
        tt = torch.cat([t[s0:s1].repeat(2 * k) for s0, s1, _ in sub])
        rr = None if regions is None else torch.cat([regions[s0:s1].repeat(2 * k, 1, 1) for s0, s1, _ in sub])
        probs = target_probs(model, imputed, tt, batch_size=batch_size, regions=rr)
        at = 0
        for s0, s1, _ in sub:
            m = s1 - s0
            scores[:, :, s0:s1] = probs[at : at + 2 * k * m].reshape(2, k, m) - base[s0:s1]
            at += 2 * k * m
    mo, le = scores[0].mean(0), scores[1].mean(0)
    return {"morf": mo, "lerf": le, "combined": ((le - mo) / 2).astype(np.float32)}


def _road_noise(removed: torch.Tensor, c: int, seed: int, std: float) -> torch.Tensor:
    """The reference's noise on the imputed pixels, (M, C, H * W) float32 on CPU (zero elsewhere):
    drawn image by image from one CPU generator in the reference's order, then added on the device
    in one copy per chunk (no host round trip per image)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros((len(removed), c, removed.shape[1]), dtype=torch.float32)
    for j, rem in enumerate(removed):
        idx = rem.nonzero()[:, 0]
        out[j][:, idx] = torch.randn((c, len(idx)), generator=g) * std
    return out


def _road_masks(cams: torch.Tensor, percentiles) -> torch.Tensor:
    """Removed pixels (2, P, N, H, W) bool, MoRF then LeRF, exactly as pytorch-grad-cam thresholds
    them (``np.percentile`` of the float32 map; kept where the map is below the threshold)."""
    out = torch.zeros((2, len(percentiles)) + tuple(cams.shape), dtype=torch.bool)
    for order in range(2):
        for pi, p in enumerate(percentiles):
            for i, cam in enumerate(cams):
                mask = cam if order == 0 else 1 - cam
                out[order, pi, i] = ~(mask < float(np.percentile(mask.numpy(), p)))
    return out


def infidelity_score(
    model,
    inputs: torch.Tensor,
    maps,
    *,
    targets,
    noise_std: float = 0.1,
    n_samples: int = 10,
    max_examples_per_batch: int | None = 64,
    seed: int = 0,
    clean_outputs: np.ndarray | None = None,
    regions: torch.Tensor | None = None,
) -> np.ndarray:
    """captum's ``infidelity`` (Yeh et al., 2019) of the maps, with Gaussian perturbations.

    The map (N, h, w) is resized to the input and repeated over the 3 channels; captum's
    ``normalize=True`` rescales it optimally, so the score does not depend on the map's scale.
    The model's softmax probabilities are explained. Lower is better. Inputs go in chunks of
    :data:`CHUNK`, the noise of each seeded with ``seed`` + its first index (so results do not
    depend on the caller's batching); ``max_examples_per_batch`` bounds the perturbed inputs in one
    forward (at least one chunk). captum forwards the unperturbed chunk once per batch of
    perturbations: that output is computed once per chunk here, or taken from ``clean_outputs``
    (N, K), the inputs' softmax when the caller has it, so the cost is ``n_samples`` forwards per
    input. ``regions`` (N, H, W): a segmentation model's region per input (as in
    :func:`perturbation_curve`), handed to captum as an additional forward argument, which it
    repeats with each input's perturbations. Returns (N,) float32.
    """
    from captum.metrics import infidelity

    n, _, h, w = inputs.shape
    t = as_targets(targets, n)
    x = inputs.detach().float().cpu()
    attr = as_tensor_maps(maps, (h, w))[:, None].expand_as(x).contiguous()

    clean: dict[str, torch.Tensor] = {}  # the current chunk's inputs and their softmax

    def forward(z, r=None):
        if "x" in clean and z.shape == clean["x"].shape and torch.equal(z, clean["x"]):
            return clean["p"]
        return torch.from_numpy(softmax_outputs(model, z, batch_size=len(z), regions=r))

    def perturb(z):
        noise = torch.randn_like(z) * noise_std
        return noise, z - noise

    out = []
    for s0, s1, mepb in chunks(n, n_samples, max_examples_per_batch):
        clean.clear()
        p = None if clean_outputs is None else torch.as_tensor(np.asarray(clean_outputs[s0:s1], np.float32))
        r = None if regions is None else regions[s0:s1].float().cpu()
        clean.update(x=x[s0:s1], p=forward(x[s0:s1], r) if p is None else p)
        with seeded(seed + s0):
            out.append(
                infidelity(
                    forward,
                    perturb,
                    x[s0:s1],
                    attr[s0:s1],
                    additional_forward_args=None if r is None else (r,),
                    target=t[s0:s1],
                    n_perturb_samples=n_samples,
                    max_examples_per_batch=mepb,
                    normalize=True,
                )
                .detach()
                .cpu()
            )
    out = torch.cat(out)
    return out.detach().cpu().numpy().astype(np.float32)
