"""Attention rollout (Abnar & Zuidema 2020) for vision transformers, recorded in the fused pass.

Every ``nn.MultiheadAttention`` of the model is hooked; its attention weights are recomputed from
the call's own query, key and value (``need_weights=True``, per head), averaged over the heads,
mixed with the identity for the residual connection (``0.5 A + 0.5 I``) and row-normalised; the
product over the blocks, first block on the right, says how much each input token flows into each
output token. The class token's row over the patch tokens, on the patch grid, is the map.

Models whose attention is not an ``nn.MultiheadAttention`` (timm's fused ``Attention``) are not
supported yet: asking for ``rollout`` on them is a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_explain.explain.card import ModelError
from wsi_explain.explain.layers import token_prefix

__all__ = ["ROLLOUT", "AttentionRecorder", "rollout_maps"]

#: the method name of attention rollout (extracted with the fused CAMs, no gradient)
ROLLOUT = "rollout"


def rollout_maps(attentions: list[torch.Tensor], *, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout from per-block attention weights.

    Parameters
    ----------
    attentions : list of (N, heads, T, T) tensors
        Each block's attention weights (rows sum to 1), in call order.
    residual : float
        Weight of the identity mixed into each block's head-averaged attention.

    Returns
    -------
    (N, side, side) float32: the class token's rollout over the patch tokens, on the patch grid
    (class and register tokens dropped, as :func:`wsi_explain.explain.layers.tokens_to_grid`).
    """
    if not attentions:
        raise ModelError("attention rollout: no attention was recorded in the forward pass")
    n, _, t, _ = attentions[0].shape
    eye = torch.eye(t, device=attentions[0].device, dtype=torch.float32)
    roll = eye.expand(n, t, t)
    for a in attentions:
        m = (1 - residual) * a.float().mean(1) + residual * eye
        m = m / m.sum(-1, keepdim=True)
        roll = m @ roll
    prefix, side = token_prefix(t)
    return roll[:, 0, prefix:].reshape(n, side, side)


class AttentionRecorder:
    """Hooks that record every ``nn.MultiheadAttention``'s weights during a forward (a context
    manager; the hooks are removed on exit)."""

    def __init__(self, module: nn.Module) -> None:
        self.blocks = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
        if not self.blocks:
            raise ModelError(
                "attention rollout needs nn.MultiheadAttention blocks (torchvision's ViT); this model has none"
            )
        self.weights: list[torch.Tensor] = []
        self._handles: list = []
        self._inside = False

    def _hook(self, mod: nn.MultiheadAttention, args, kwargs, out):
        if self._inside:
            return None
        q, k, v = (list(args) + [kwargs.get(x) for x in ("query", "key", "value")])[:3]
        self._inside = True
        try:
            with torch.no_grad():
                _, w = mod(q, k, v, need_weights=True, average_attn_weights=False)
        finally:
            self._inside = False
        self.weights.append(w.detach())
        return None

    def __enter__(self) -> AttentionRecorder:
        self.weights = []
        self._handles = [b.register_forward_hook(self._hook, with_kwargs=True) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
