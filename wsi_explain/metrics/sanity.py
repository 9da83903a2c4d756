"""Sanity check: cascading model-parameter randomisation (Adebayo et al., 2018).

Layers are re-initialised cumulatively from the output end; after each step the maps of the same
inputs and targets are compared with the original ones. A method whose maps barely change when
the weights they claim to explain are destroyed fails the test.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from wsi_explain.explain.maps import minmax_maps

__all__ = ["randomisation_blocks", "cascading_randomisation", "spearman_rows", "ssim_rows"]

logger = logging.getLogger(__name__)


def randomisation_blocks(model: nn.Module) -> list[str]:
    """Names of the top-level children that hold parameters, from the output end backwards
    (e.g. ResNet: fc, layer4, layer3, layer2, layer1, bn1, conv1)."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    if len(names) == 1:  # a wrapper (features/classifier inside one child): go one level down
        inner = getattr(model, names[0])
        sub = [f"{names[0]}.{n}" for n, m in inner.named_children() if any(True for _ in m.parameters())]
        names = sub or names
    return names[::-1]


def _reinit(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            with torch.no_grad():
                if p.ndim > 1:
                    fan_in = int(np.prod(p.shape[1:]))
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                elif name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=1)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (N, h, w) -> (N,) float32 (NaN if constant)."""
    ra, rb = _ranks(a.reshape(len(a), -1)), _ranks(b.reshape(len(b), -1))
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan).astype(np.float32)


def ssim_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each pair of maps after per-map min-max to [0, 1] -> (N,) float32."""
    from skimage.metrics import structural_similarity

    out = []
    a, b = minmax_maps(np.asarray(a, np.float64)), minmax_maps(np.asarray(b, np.float64))
    for x, y in zip(a, b):
        win = min(7, *x.shape)
        win -= 1 - win % 2  # odd
        if win < 3:
            out.append(np.nan)
            continue
        out.append(structural_similarity(x, y, data_range=1.0, win_size=win))
    return np.asarray(out, np.float32)


def cascading_randomisation(
    model: nn.Module,
    explain: Callable[[nn.Module, torch.Tensor, torch.Tensor], np.ndarray],
    inputs: torch.Tensor,
    *,
    targets,
    blocks: list[str] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Maps after randomising the model cumulatively, block by block, from the output end.

    Parameters
    ----------
    model : nn.Module (not modified: a deep copy is randomised)
    explain : callable ``explain(module, x, targets)`` -> maps (N, h, w) ndarray
    inputs : (N, 3, H, W) float tensor
    targets : (N,) int; the same classes are explained at every step.
    blocks : module names in randomisation order (default :func:`randomisation_blocks`).

    Returns
    -------
    One dict per step: ``step`` (1-based), ``block`` (the block randomised at this step),
    ``spearman`` and ``ssim`` (N,) float32 arrays comparing with the original maps.
    """
    from ._common import as_targets

    t = as_targets(targets, len(inputs))
    blocks = blocks or randomisation_blocks(model)
    original = np.asarray(explain(model, inputs, t), np.float32)
    work = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for i, name in enumerate(blocks, 1):
        sub = work.get_submodule(name)
        _reinit(sub, gen)
        maps = np.asarray(explain(work, inputs, t), np.float32)
        steps.append(
            {"step": i, "block": name, "spearman": spearman_rows(original, maps), "ssim": ssim_rows(original, maps)}
        )
    return steps
