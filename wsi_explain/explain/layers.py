"""Finding layers in a model: by name, by tracing one forward, and the defaults for the CAM layer
and the classifier (whose input is the embedding)."""

from __future__ import annotations

import torch
from torch import nn

from wsi_explain.explain.adapters import _Call
from wsi_explain.explain.card import ModelError

__all__ = ["find_module", "trace", "default_target_layer", "default_classifier"]


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


def default_target_layer(model: nn.Module, tile_px: int = 224) -> str:
    """Name of the last convolutional block: the outermost module producing the last (N, C, h, w)
    output with h * w > 1 (``layer4`` for ResNet, ``features`` for DenseNet, EfficientNet,
    MobileNet, ConvNeXt and VGG, ``head_act`` for EfficientNet-Lite)."""
    calls = trace(model, tile_px)
    spatial = [(n, m, o) for n, m, o in calls if o.ndim == 4 and o.shape[2] * o.shape[3] > 1]
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
