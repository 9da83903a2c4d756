"""Robustness: how much a method's maps change under small input perturbations."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ._common import as_targets, chunks, seeded

__all__ = ["sensitivity"]


def sensitivity(
    explain: Callable[..., torch.Tensor | np.ndarray],
    inputs: torch.Tensor,
    *,
    targets,
    radius: float = 0.02,
    n_samples: int = 8,
    max_examples_per_batch: int | None = 32,
    seed: int = 0,
    masks: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """captum's ``sensitivity_max`` (Yeh et al., 2019) of an explanation function.

    Parameters
    ----------
    explain : callable ``explain(x, target=...)`` -> maps (n, H, W) for a batch x (n, 3, H, W),
        e.g. ``lambda x, target: attributor.attribute(x, targets=target)``.
    inputs : (N, 3, H, W) float tensor, normalised; not modified.
    targets : (N,) int or int (the same classes are explained for the perturbed copies).
    radius : float
        Perturbations are uniform in [-radius, radius] in normalised input units.
    n_samples : int
        Perturbed copies per input; the maximum change is kept.
    masks : (N, H, W), optional
        Per-input regions handed to ``explain(x, target=..., masks=...)`` with every copy of
        their input (a segmentation model's region target from annotations); the region stays
        the unperturbed tile's.

    Returns
    -------
    (N,) float32 (inputs in seeded chunks, as :func:`infidelity_score`): max over the copies of
    ||map(x + e) - map(x)|| / ||map(x)|| (Frobenius; lower is more robust).
    """
    from captum.metrics import sensitivity_max

    n = len(inputs)
    t = as_targets(targets, n)

    def fn(x, target=None, additional_forward_args=None):
        if isinstance(x, tuple):  # captum passes the inputs as a tuple
            (x,) = x
        if additional_forward_args is None:
            out = explain(x, target=target)
        else:  # the masks, expanded by captum with the inputs
            out = explain(x, target=target, masks=additional_forward_args[0])
        out = torch.as_tensor(np.asarray(out, np.float32)) if not isinstance(out, torch.Tensor) else out.float()
        return (out,)  # captum zips over a tuple of explanations

    x = inputs.detach().float().cpu()
    mk = None if masks is None else torch.as_tensor(np.asarray(masks))
    out = []
    for s0, s1, mepb in chunks(n, n_samples, max_examples_per_batch):
        extra = {} if mk is None else {"additional_forward_args": (mk[s0:s1],)}
        with seeded(seed + s0):
            out.append(
                sensitivity_max(
                    fn,
                    x[s0:s1],
                    perturb_radius=radius,
                    n_perturb_samples=n_samples,
                    max_examples_per_batch=mepb,
                    target=t[s0:s1],
                    **extra,
                )
                .detach()
                .cpu()
            )
    out = torch.cat(out)
    return out.detach().cpu().numpy().astype(np.float32)
