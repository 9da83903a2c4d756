"""What the pipeline knows about a model: its card (classes, normalisation, tile size, µm/px),
the loaded model, and the errors of model loading."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_explain.core.errors import WsiExplainError

__all__ = ["ModelError", "CheckpointTrustError", "ModelCard", "LoadedModel", "IMAGENET_MEAN", "IMAGENET_STD"]

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
    task : str
        "classification" (logits (N, K)) or "segmentation" (per-pixel logits (N, K, H, W),
        explained through region targets: :mod:`wsi_explain.explain.segmentation`); set at load
        from the model's output.
    """

    num_classes: int
    class_names: tuple[str, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tile_px: int | None = None
    mpp: float | None = None
    task: str = "classification"

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
                raise ModelError(
                    f"the number of classes is unknown: pass --num-classes or write it in a model card ({path})"
                )
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
