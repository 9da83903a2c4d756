"""Loading the classifier: torchvision architecture + state dict, a ``torch.export`` program
(``.pt2``), TorchScript, or an entry point.

Checkpoints load with ``torch.load(weights_only=True)``; a file that needs full unpickling is
refused unless the user passes ``--trust-checkpoint``. A model card (YAML or JSON beside the
weights) may give the class names, number of classes, normalisation and tile size.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from wsi_explain.explain.adapters import ScriptedSequential, efficientnet_lite0
from wsi_explain.explain.card import CheckpointTrustError, LoadedModel, ModelCard, ModelError

__all__ = ["load_model", "load_state_dict"]

logger = logging.getLogger(__name__)


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


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    from wsi_explain.explain.segmentation import TORCHVISION_SEGMENTATION

    try:
        if name in TORCHVISION_SEGMENTATION:  # no backbone weights either: nothing is downloaded
            return torchvision.models.get_model(
                name, weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
            )
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise ModelError(f"unknown torchvision architecture {name!r} ({exc})") from exc


def _entry_point(spec: str, num_classes: int, **extra) -> nn.Module:
    """``package.module:factory`` called with ``num_classes`` (and ``extra``), else with nothing."""
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise ModelError(f"entry point {spec!r} must look like 'package.module:factory'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import entry point {spec!r} ({exc})") from exc
    try:
        model = fn(num_classes=num_classes, **extra)
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


def _timm(name: str, num_classes: int, tile_px: int | None) -> torch.nn.Module:
    """A timm model, randomly initialised (weights come from ``--weights``: nothing is downloaded);
    ViTs and Swins are built for ``tile_px`` inputs when the card gives one."""
    try:
        import timm
    except ImportError as exc:
        raise ModelError(f"timm:{name} needs timm: pip install timm") from exc
    if name not in timm.list_models():
        raise ModelError(f"timm has no model {name!r}; see timm.list_models()")
    if tile_px:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=tile_px)
        except TypeError:  # a model without an input size (a CNN)
            pass
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


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
    input_px: int | None = None,
) -> LoadedModel:
    """Load a model for extraction.

    Parameters
    ----------
    arch : str
        A torchvision architecture name (``resnet18``...), ``efficientnet_lite0`` (ImageNet
        weights shipped offline), ``export`` (``weights`` is a ``torch.export`` program, ``.pt2``;
        see :mod:`wsi_explain.explain.exported`), ``torchscript`` (``weights`` is a TorchScript
        file; deprecated by torch), ``timm:<name>`` (a timm model, random init: weights come from
        ``weights``, nothing is downloaded), or an entry
        point ``package.module:factory`` returning an ``nn.Module`` (called with ``num_classes``).
    weights : path, optional
        State-dict checkpoint (loaded with ``weights_only=True``) or TorchScript file.
    num_classes, class_names, mean, std, tile_px :
        Override the model card.
    card : path, optional
        Model card; default: ``<weights>.yaml``/``.json`` or ``model_card.yaml``/``.json`` beside it.
    trust_checkpoint : bool
        Allow full unpickling of a checkpoint that needs it.
    input_px : int, optional
        Edge of the tiles the model will see, for the load-time checks of exported and TorchScript
        programs (default: the card's ``tile_px``, else 224).

    Raises
    ------
    ModelError, CheckpointTrustError
    """
    wpath = Path(weights) if weights is not None else None
    card_path = _find_card(wpath, Path(card) if card else None)
    mc = ModelCard.read(
        card_path, num_classes=num_classes, class_names=class_names, mean=mean, std=std, tile_px=tile_px
    )
    whash = _file_hash(wpath) if wpath is not None and wpath.is_file() else ""
    if arch == "export":
        from wsi_explain.explain.exported import load_exported

        if wpath is None:
            raise ModelError("--model export needs --weights: the .pt2 file of the exported program")
        module = load_exported(wpath, tile_px=input_px or mc.tile_px or 224, trust=trust_checkpoint)
    elif arch == "torchscript":
        if wpath is None or not wpath.is_file():
            raise ModelError(f"{wpath}: TorchScript file does not exist")
        try:
            scripted = torch.jit.load(str(wpath), map_location="cpu")
        except RuntimeError as exc:
            raise ModelError(f"{wpath}: not a TorchScript file ({exc})") from exc
        module = ScriptedSequential.from_script(scripted, tile_px=input_px or mc.tile_px or 224, path=wpath)
    else:
        # random initialisation is seeded, so a model without weights is the same in every process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if arch == "efficientnet_lite0":
                module = efficientnet_lite0(num_classes=mc.num_classes, pretrained=wpath is None)
            elif arch.startswith("timm:"):
                module = _timm(arch[5:], mc.num_classes, mc.tile_px)
            elif ":" in arch:
                module = _entry_point(arch, mc.num_classes)
            else:
                module = _torchvision(arch, mc.num_classes)
        if wpath is not None:
            sd = load_state_dict(wpath, trust=trust_checkpoint)
            try:
                module.load_state_dict(sd)
            except RuntimeError as exc:
                raise ModelError(
                    f"{wpath}: weights do not fit {arch} with {mc.num_classes} classes ({str(exc)[:400]})"
                ) from exc
    module.eval()
    module, mc = _segmentation(module, mc, input_px or mc.tile_px or 224)
    model_id = f"{arch}" + (f"@{wpath.name}" if wpath else "")
    return LoadedModel(module=module, card=mc, model_id=model_id, weights_hash=whash)


def _segmentation(module: nn.Module, card, px: int):
    """A network with per-pixel outputs (a dict with "out", or (N, K, H, W)) becomes a
    :class:`~wsi_explain.explain.segmentation.SegmentationNet` with ``card.task = "segmentation"``."""
    import dataclasses

    from wsi_explain.explain.segmentation import SegmentationNet, is_segmentation_output

    if isinstance(module, torch.jit.ScriptModule):
        return module, card
    p = next(module.parameters(), None)
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, px, px, device=p.device if p is not None else "cpu"))
    except Exception:  # noqa: BLE001 - a model for another input size: the extractor's own check says so
        return module, card
    if not is_segmentation_output(out):
        return module, card
    return SegmentationNet(module).eval(), dataclasses.replace(card, task="segmentation")
