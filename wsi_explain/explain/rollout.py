"""Attention rollout (Abnar & Zuidema 2020) for vision transformers, recorded in the fused pass.

Every ``nn.MultiheadAttention`` of the model is hooked; its attention weights are recomputed from
the call's own query, key and value (``need_weights=True``, per head), averaged over the heads,
mixed with the identity for the residual connection (``0.5 A + 0.5 I``) and row-normalised; the
product over the blocks, first block on the right, says how much each input token flows into each
output token. The class token's row over the patch tokens, on the patch grid, is the map.

timm's ``Attention`` blocks (ViT, DeiT, DINOv2-style ViTs with registers) compute attention with a
fused kernel that never forms the weights: while recording, their ``fused_attn`` is switched off
(the same computation, unfused) and the softmaxed weights are read where they enter ``attn_drop``
(an identity in eval mode); the flag is restored on exit. Models with neither (Swin's window
attention, CNNs) get a clear error.
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
        self.timm_blocks = [m for m in module.modules() if _is_timm_attention(m)]
        if not self.blocks and not self.timm_blocks:
            raise ModelError(
                "attention rollout needs global self-attention blocks (torchvision's nn.MultiheadAttention or "
                "timm's Attention); this model has none"
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

    def _timm_hook(self, mod: nn.Module, args) -> None:
        self.weights.append(args[0].detach())  # the softmaxed (N, heads, T, T) weights

    def __enter__(self) -> AttentionRecorder:
        self.weights = []
        self._handles = [b.register_forward_hook(self._hook, with_kwargs=True) for b in self.blocks]
        self._fused = [b.fused_attn for b in self.timm_blocks]
        for b in self.timm_blocks:
            b.fused_attn = False
            self._handles.append(b.attn_drop.register_forward_pre_hook(self._timm_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for b, f in zip(self.timm_blocks, getattr(self, "_fused", [])):
            b.fused_attn = f


def _is_timm_attention(m: nn.Module) -> bool:
    """timm's global self-attention (``timm.layers.Attention``): q/k/v from one projection, a
    ``fused_attn`` switch and an ``attn_drop`` that receives the weights when unfused."""
    return (
        type(m).__name__ == "Attention"
        and type(m).__module__.startswith("timm.")
        and hasattr(m, "fused_attn")
        and hasattr(m, "attn_drop")
        and hasattr(m, "qkv")
    )
