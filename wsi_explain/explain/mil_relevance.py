"""Which tiles a slide decision rests on: tile relevance for a MIL head, on the stored embeddings.

For one bag (N, D) and one class k, each function gives one signed value per tile:

- :func:`attention_relevance`: the head's attention, raw and softmaxed (class-agnostic; the usual
  answer, and not a faithful one: xMIL, Hense et al. 2024);
- :func:`gradient_x_input`: ``sum_d h_id * d logit_k / d h_id`` (captum's InputXGradient summed
  over the embedding);
- :func:`integrated_gradients`: ``sum_d (h_id - b_id) * mean_s d logit_k / d h_id`` along the
  straight path from a baseline bag ``b`` (zero, or every tile the bag's mean embedding) to the bag,
  trapezoid rule over ``steps`` intervals (captum's ``riemann_trapezoid``); the values sum to
  ``logit_k(bag) - logit_k(baseline)`` up to the discretisation (``delta`` says how far);
- :func:`leave_one_out`: ``logit_k(bag) - logit_k(bag without tile i)`` on a seeded sample of
  tiles: the ground truth the others are scored against (Spearman per slide).

Bags are evaluated on the head's device in float32; gradients flow to the embeddings only.
"""

from __future__ import annotations

import numpy as np
import torch

from wsi_explain.explain.card import ModelError

__all__ = ["attention_relevance", "gradient_x_input", "integrated_gradients", "leave_one_out"]


def _bag(model, bag) -> torch.Tensor:
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    return torch.as_tensor(np.asarray(bag), dtype=torch.float32, device=dev)


def attention_relevance(model, bag) -> tuple[np.ndarray, np.ndarray] | None:
    """(raw, softmaxed) (N,) attention of the head on ``bag``; None when the head has none."""
    with torch.no_grad():
        model(_bag(model, bag))
    if model.attention is None:
        return None
    raw = model.attention.float().cpu()
    return raw.numpy(), torch.softmax(raw, 0).numpy()


def _grad(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """d logit_k / d x for one bag x (N, D)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[k], x)
    return g


def gradient_x_input(model, bag, *, target: int) -> np.ndarray:
    """(N,) gradient x input of class ``target``'s logit, summed over the embedding."""
    _check_target(model, target)
    x = _bag(model, bag)
    with torch.enable_grad():
        g = _grad(model, x, target)
    return (g * x).sum(1).detach().cpu().numpy()


def integrated_gradients(
    model, bag, *, target: int, baseline: str = "zero", steps: int = 32
) -> tuple[np.ndarray, float]:
    """(N,) Integrated Gradients of class ``target``'s logit over the whole bag, and the
    completeness gap ``|sum - (logit(bag) - logit(baseline))|``.

    ``baseline``: ``"zero"`` or ``"mean"`` (every tile replaced by the bag's mean embedding).
    """
    _check_target(model, target)
    x = _bag(model, bag)
    if baseline == "zero":
        b = torch.zeros_like(x)
    elif baseline == "mean":
        b = x.mean(0, keepdim=True).expand_as(x)
    else:
        raise ValueError(f"baseline must be 'zero' or 'mean', not {baseline!r}")
    alphas = torch.linspace(0, 1, steps + 1).tolist()
    weights = [1.0 / steps] * (steps + 1)
    weights[0] = weights[-1] = 0.5 / steps  # trapezoid rule
    avg = torch.zeros_like(x)
    with torch.enable_grad():  # one point of the path at a time: memory of one bag, not steps + 1
        for a, w in zip(alphas, weights):
            avg.add_(_grad(model, b + a * (x - b), target), alpha=w)
    rel = ((x - b) * avg).sum(1)
    with torch.no_grad():
        gap = float(model(x)[target] - model(b)[target] - rel.sum())
    return rel.detach().cpu().numpy(), abs(gap)


def leave_one_out(model, bag, *, target: int, sample: int | None = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logit drop of class ``target`` when each sampled tile is left out of the bag.

    Returns
    -------
    (rows (S,) int64 of the sampled tiles, sorted; drops (S,) float32). A bag of one tile has no
    bag left without it: empty arrays (the caller reports it).
    """
    _check_target(model, target)
    x = _bag(model, bag)
    n = x.shape[0]
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows = (
        np.arange(n)
        if sample is None or sample >= n
        else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    )
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    with torch.no_grad():
        full = float(model(x)[target])
        drops = []
        for r in rows:
            keep[r] = False
            drops.append(full - float(model(x[keep])[target]))
            keep[r] = True
    return rows.astype(np.int64), np.asarray(drops, np.float32)


def _check_target(model, target: int) -> None:
    if not 0 <= target < model.n_classes:
        raise ModelError(f"target class {target} out of range for {model.n_classes} classes")
