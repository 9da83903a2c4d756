"""Helpers shared by the metrics: map resizing and normalisation, batched target probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "as_tensor_maps",
    "target_probs",
    "softmax_outputs",
    "stream_probs",
    "as_targets",
    "model_device",
    "chunks",
    "seeded",
    "CHUNK",
]

#: inputs per seeded chunk of the stochastic metrics (infidelity, sensitivity)
CHUNK = 8

Forward = Callable[[torch.Tensor], torch.Tensor]


def as_tensor_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps ``(N, h, w)`` (any float dtype) -> ``(N, H, W)`` float32, bilinearly resized to ``size``.

    The input is not modified (a resized copy, or a float32 copy when the size already matches).
    """
    t = torch.as_tensor(np.asarray(maps, np.float32) if not isinstance(maps, torch.Tensor) else maps).float()
    if t.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {tuple(t.shape)}")
    if tuple(t.shape[-2:]) == tuple(size):
        return t.clone()
    return F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def as_targets(targets, n: int) -> torch.Tensor:
    """(n,) int64 tensor of target classes from an int, a sequence or an array."""
    if isinstance(targets, (int, np.integer)):
        return torch.full((n,), int(targets), dtype=torch.long)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    if len(t) != n:
        raise ValueError(f"{len(t)} targets for {n} inputs")
    return t


def model_device(model) -> torch.device:
    """Device of a module's first parameter (CPU for a plain callable or a parameter-free module)."""
    params = getattr(model, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return p.device if p is not None else torch.device("cpu")


def _softmax(model: Forward, x: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """(B, K) softmax of one batch, on the model's device: ``model(x)``, or ``model(x, regions)``
    when the batch has regions (a segmentation model's
    :class:`~wsi_explain.explain.segmentation.RegionProbNet`)."""
    dev = model_device(model)
    out = model(x.to(dev)) if regions is None else model(x.to(dev), regions.to(dev))
    return torch.softmax(out.float(), 1)


def _probs(model: Forward, x: torch.Tensor, targets: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """(B,) softmax probability of ``targets`` for one batch, on the model's device."""
    p = _softmax(model, x, regions)
    return p.gather(1, targets[:, None].to(p.device))[:, 0]


@torch.no_grad()
def softmax_outputs(
    model: Forward, x: torch.Tensor, *, batch_size: int = 32, regions: torch.Tensor | None = None
) -> np.ndarray:
    """The model's softmax (N, K) float32 for inputs ``x`` (N, 3, H, W), in batches; ``regions``
    (N, H, W) as in :func:`target_probs`."""
    parts = []
    for s in range(0, len(x), batch_size):
        parts.append(_softmax(model, x[s : s + batch_size], None if regions is None else regions[s : s + batch_size]))
    return torch.cat([p.cpu() for p in parts]).numpy().astype(np.float32)


@torch.no_grad()
def target_probs(
    model: Forward,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 32,
    regions: torch.Tensor | None = None,
) -> np.ndarray:
    """Softmax probability of ``targets`` (N,) for inputs ``x`` (N, 3, H, W), in batches -> (N,) float32.

    ``regions`` (N, H, W), optional: the region each input's score is read over, passed to the
    model as ``model(x, regions)`` (a segmentation model's region target:
    :class:`~wsi_explain.explain.segmentation.RegionProbNet`).
    """
    p = softmax_outputs(model, x, batch_size=batch_size, regions=regions)
    return p[np.arange(len(p)), torch.as_tensor(targets).cpu().numpy()]


@torch.no_grad()
def stream_probs(
    model: Forward,
    build: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    n_items: int,
    targets: torch.Tensor,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Softmax probability of ``targets`` (n_items,) for ``n_items`` perturbed inputs that are only
    built batch by batch: ``build(idx)`` returns the inputs (len(idx), 3, H, W) of the item indices
    ``idx`` (int64, on CPU), or (inputs, regions (len(idx), H, W)) for a model read over regions.
    Every forward is a full batch whatever the items are (steps of a curve, tiles, methods), and no
    more than one batch of perturbed inputs exists at once -> (n_items,) float32.
    """
    out = []
    for s in range(0, n_items, batch_size):
        idx = torch.arange(s, min(n_items, s + batch_size))
        b = build(idx)
        z, r = b if isinstance(b, tuple) else (b, None)
        out.append(_probs(model, z, targets[idx], r).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def chunks(n: int, samples: int, max_examples: int | None) -> list[tuple[int, int, int]]:
    """(start, stop, max_examples_per_batch) of chunks of :data:`CHUNK` inputs; the batch bound is
    clamped to what captum accepts (between the chunk size and chunk size x samples)."""
    out = []
    for s0 in range(0, n, CHUNK):
        s1 = min(n, s0 + CHUNK)
        k = s1 - s0
        mepb = k * samples if max_examples is None else min(max(max_examples, k), k * samples)
        out.append((s0, s1, mepb))
    return out


@contextlib.contextmanager
def seeded(seed: int):
    """Torch's CPU generator seeded with ``seed`` inside the block, restored after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
