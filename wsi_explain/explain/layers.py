"""Finding layers in a model: by name, by tracing one forward, and the defaults for the CAM layer
and the classifier (whose input is the embedding)."""

from __future__ import annotations

import math

import torch
from torch import nn

from wsi_explain.explain.adapters import _Call
from wsi_explain.explain.card import ModelError

__all__ = [
    "find_module",
    "trace",
    "default_target_layer",
    "default_classifier",
    "tokens_to_grid",
    "token_prefix",
    "channels_last_output",
]


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path, as in ``named_modules``)."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = [n for n in modules if n and (name in n or n.split(".")[-1] == name.split(".")[-1])][:8]
        raise ModelError(f"the model has no layer named {name!r}" + (f"; similar: {close}" if close else ""))
    return modules[name]


def trace(model: nn.Module, tile_px: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Every (name, module, output) of one forward of a zero (1, 3, tile_px, tile_px) input, in call
    order; modules called twice appear twice, scripted modules (no hooks) are left out."""
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, torch.jit.ScriptModule):
            continue

        def hook(m, inp, out, _name=name):
            if isinstance(out, torch.Tensor):
                calls.append((_name, m, out))

        handles.append(mod.register_forward_hook(hook))
    try:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, 3, tile_px, tile_px, device=dev))
    finally:
        for h in handles:
            h.remove()
    return calls


def token_prefix(n_tokens: int) -> tuple[int, int]:
    """(prefix, side) of a vision transformer's token sequence: the patch tokens form the largest
    square grid (side x side) that fits, the rest come first (the class token, register tokens).
    A class token and registers never make the whole sequence a square above 3 x 3 patches."""
    side = int(math.isqrt(n_tokens))
    return n_tokens - side * side, side


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, C) transformer tokens -> (N, C, side, side) patch grid, the prefix tokens (class,
    registers) dropped: pytorch-grad-cam's ``reshape_transform`` for ViTs."""
    n, t, c = tokens.shape
    prefix, side = token_prefix(t)
    return tokens[:, prefix:, :].reshape(n, side, side, c).permute(0, 3, 1, 2)


def channels_last_output(module: nn.Module, out: torch.Tensor) -> bool:
    """True for a LayerNorm over the last axis of a 4-D output: an (N, h, w, C) feature map (Swin's
    layers in timm), which the CAMs read as (N, C, h, w). ConvNeXt's LayerNorm2d normalises C of an
    (N, C, h, w) map and is left alone."""
    return (
        isinstance(module, nn.LayerNorm)
        and out.ndim == 4
        and out.shape[-1] == module.normalized_shape[-1]
        and out.shape[1] != out.shape[-1]
    )


def _transformer_norm(calls) -> str | None:
    """The first LayerNorm of the last transformer block (``encoder.layers.encoder_layer_11.ln_1``
    in torchvision's ViT, ``blocks.11.norm1`` in timm's): its output feeds the block's attention,
    so every patch token gets a gradient (the final norm's do not: only the class token reaches
    the head). None when no block has two LayerNorms on (N, T, C) tokens."""
    blocks: dict[str, list[str]] = {}
    for n, m, o in calls:
        if isinstance(m, nn.LayerNorm) and o.ndim == 3 and token_prefix(o.shape[1])[1] > 1:
            blocks.setdefault(n.rpartition(".")[0], []).append(n)
    full = [names for names in blocks.values() if len(names) >= 2]
    return full[-1][0] if full else None


def default_target_layer(model: nn.Module, tile_px: int = 224) -> str:
    """Name of the CAM layer. For a CNN, the last convolutional block: the outermost module
    producing the last (N, C, h, w) output with h * w > 1 (``layer4`` for ResNet, ``features`` for
    DenseNet, EfficientNet, MobileNet, ConvNeXt and VGG, ``head_act`` for EfficientNet-Lite). For a
    vision transformer (LayerNorms on (N, T, C) tokens after the patch embedding), the first norm
    of the last block (its tokens are reshaped to the patch grid: :func:`tokens_to_grid`). For a
    network whose last feature map is channels-last (N, h, w, C) from a LayerNorm (Swin), that
    norm (read as (N, C, h, w))."""
    calls = trace(model, tile_px)
    vit = _transformer_norm(calls)
    if vit is not None:
        return vit
    spatial = [(n, m, o) for n, m, o in calls if o.ndim == 4 and o.shape[2] * o.shape[3] > 1]
    if spatial and channels_last_output(spatial[-1][1], spatial[-1][2]):
        return spatial[-1][0]  # the network ends channels-last (Swin's final norm): that norm itself
    if not spatial:
        raise ModelError("no layer with a spatial (N, C, h, w) output found; name one with --target-layer")
    last = spatial[-1][2]
    same = [n for n, _, o in spatial if o is last]
    counts: dict[str, int] = {}
    for n, _, _ in calls:
        counts[n] = counts.get(n, 0) + 1
    same = [n for n in same if counts[n] == 1] or same
    return min(same, key=lambda n: (n.count("."), len(n)))


def default_classifier(model: nn.Module, tile_px: int = 224) -> str:
    """Name of the final classifier layer: the last ``nn.Linear`` (or 1x1 conv) in module order;
    for a model without such modules (an unflattened ``torch.export`` program, whose layers are
    graph interpreters), the last leaf module called with a 2-D (N, D) output."""
    if not any(isinstance(m, (nn.Linear, nn.Conv2d, _Call)) for m in model.modules()):
        leaves = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
        flat = [n for n, _, o in trace(model, tile_px) if o.ndim == 2 and n in leaves]
        if flat:
            return flat[-1]
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, _Call) and mod.flatten:
            last = name
        elif isinstance(mod, nn.Linear) or (
            isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and "classifier" in name
        ):
            last = name
    if last is None:
        raise ModelError("no nn.Linear classifier found; name the embedding layer with --embedding-layer")
    return last
