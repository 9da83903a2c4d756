"""One forward pass per batch giving logits, embeddings, target-layer activations and CAMs.

The trunk (everything up to the target layer) runs under ``no_grad``; the target layer's
output becomes a leaf that requires grad, only the head (the layers after it) runs with grad,
and ``torch.autograd.grad`` of the target scores to that leaf gives the gradient: no backward
through the trunk, the input or the weights. This costs about one forward pass in all.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsi_explain.explain.cams import FUSED_CAMS, fused_cams, needs_grad
from wsi_explain.explain.card import LoadedModel, ModelError
from wsi_explain.explain.layers import (
    channels_last_output,
    default_classifier,
    default_target_layer,
    find_module,
    tokens_to_grid,
)
from wsi_explain.explain.rollout import ROLLOUT, AttentionRecorder, rollout_maps

__all__ = ["FusedExtractor", "FusedOutput", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class FusedOutput:
    """Outputs of one batch (NumPy, on the CPU).

    Attributes
    ----------
    logits : (N, K) float32 (segmentation: log of each class's predicted area share)
    embeddings : (N, D) float32
    targets : (N,) int64, the class each CAM explains
    cams : dict name -> (N, h, w) float32, ReLU'd, unnormalised, at the target layer's resolution
    activations : (N, C, h, w) float32 or None (post-ReLU when the layer's output can be negative)
    class_probs : (N, K) float32 or None: segmentation only, the mean softmax probability per class
    """

    logits: np.ndarray
    embeddings: np.ndarray
    targets: np.ndarray
    cams: dict
    activations: np.ndarray | None = None
    class_probs: np.ndarray | None = None


class FusedExtractor:
    """Fused forward pass over a model (use as a context manager: hooks are always removed).

    Parameters
    ----------
    model : LoadedModel
    methods : sequence of str
        Fused CAMs to compute (:data:`wsi_explain.explain.cams.FUSED_CAMS`), and ``"rollout"``
        (attention rollout, for ViTs with ``nn.MultiheadAttention``: :mod:`wsi_explain.explain.rollout`).
    target_layer : str, optional
        Dotted module name; default :func:`default_target_layer`.
    embedding_layer : str, optional
        Module whose *input* is the embedding; default: the final classifier layer.
    target : "pred" or int
        Class explained by the CAMs: the predicted class per tile, or a fixed class index.
    device : str
        "auto", "cpu", "cuda", "cuda:1"...
    keep_activations : bool
        Return the target-layer activations (for concept discovery).
    amp : bool
        On CUDA, run the forward under autocast (bf16 when supported, else fp16); CAMs are
        computed in float32 from the autocast activations.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        methods: tuple[str, ...] = ("gradcam",),
        target_layer: str | None = None,
        embedding_layer: str | None = None,
        target: str | int = "pred",
        device: str = "auto",
        keep_activations: bool = False,
        amp: bool = True,
        tile_px: int = 224,
        region: str | None = None,
    ) -> None:
        unknown = [m for m in methods if m not in FUSED_CAMS and m != ROLLOUT]
        if unknown:
            raise ModelError(f"unknown fused CAM method(s) {unknown}; choose from {sorted(FUSED_CAMS)} or rollout")
        self.model = model
        self.methods = tuple(methods)
        self._cams = tuple(m for m in methods if m != ROLLOUT)  # from the target layer; rollout from attention
        self.device = resolve_device(device)
        self.module = model.module.to(self.device).eval().to(memory_format=torch.channels_last)
        self.tile_px = tile_px
        self.segmentation = model.card.task == "segmentation"
        if self.segmentation:
            from wsi_explain.explain.segmentation import REGIONS, segmentation_layer

            if (region or "predicted") not in REGIONS:
                raise ModelError(f"unknown region target {region!r}: one of {REGIONS}")
            self.region = region or "predicted"
            self.target_layer = target_layer or segmentation_layer(self.module, tile_px)
            self.embedding_layer = embedding_layer or self.target_layer  # pooled over space
        else:
            if region is not None:
                raise ModelError(
                    f"{model.model_id} is a classifier (logits (N, K)): a region target ({region!r}) needs a "
                    "segmentation model with per-pixel outputs"
                )
            self.region = None
            self.target_layer = target_layer or default_target_layer(self.module, tile_px)
            self.embedding_layer = embedding_layer or default_classifier(self.module, tile_px)
        self._layer = find_module(self.module, self.target_layer)
        self._attention = AttentionRecorder(self.module) if ROLLOUT in self.methods else None
        self._emb = find_module(self.module, self.embedding_layer)
        if isinstance(target, str) and target != "pred":
            if target in model.card.class_names:
                target = model.card.class_names.index(target)
            else:
                try:
                    target = int(target)
                except ValueError:
                    raise ModelError(f"target {target!r} is neither 'pred', a class index nor a class name") from None
        if isinstance(target, int) and not 0 <= target < model.card.num_classes:
            raise ModelError(f"target class {target} out of range for {model.card.num_classes} classes")
        self.target = target
        self.keep_activations = keep_activations
        self.amp = amp and self.device.type == "cuda"
        self._amp_dtype = (
            torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        )
        self._handles: list = []
        self._state: dict = {}
        self._norm: tuple | None = None
        self._check_shapes()

    # -- hooks ---------------------------------------------------------------------------------
    def _layer_hook(self, module: nn.Module, inp, out):
        if "leaf" in self._state:
            raise ModelError(f"target layer {self.target_layer!r} is called more than once per forward; name another")
        if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4):
            raise ModelError(
                f"target layer {self.target_layer!r} must output an (N, C, h, w) tensor or (N, T, C) tokens"
            )
        leaf = out.detach().requires_grad_(self._grad)
        self._state["leaf"] = leaf
        self._state["nhwc"] = channels_last_output(module, out)
        torch.set_grad_enabled(self._grad)  # the head runs with grad; restored after the forward
        # a clone, so that in-place ops of the head (DenseNet's relu_) do not touch the leaf
        return leaf.clone()

    def _emb_hook(self, module: nn.Module, inp):
        self._state["emb"] = inp[0].detach()

    def _emb_out_hook(self, module: nn.Module, inp, out):
        """Segmentation: the embedding layer's output, averaged over space."""
        o = out.detach()
        self._state["emb"] = o.float().mean((2, 3)) if o.ndim == 4 else o

    def __enter__(self) -> FusedExtractor:
        self._handles = [
            self._layer.register_forward_hook(self._layer_hook),
            self._emb.register_forward_hook(self._emb_out_hook)
            if self.segmentation
            else self._emb.register_forward_pre_hook(self._emb_hook),
        ]
        if self._attention is not None:
            self._attention.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._attention is not None:
            self._attention.__exit__(*exc)

    def _check_shapes(self) -> None:
        """A dummy forward: the output must be (1, num_classes) and both layers must fire."""
        with self:
            x = torch.zeros(1, 3, self.tile_px, self.tile_px, device=self.device)
            masks = torch.ones(1, self.tile_px, self.tile_px) if self.region == "mask" else None
            out = self.forward(x, masks=masks)
        k = self.model.card.num_classes
        if out.logits.shape != (1, k):
            raise ModelError(
                f"{self.model.model_id}: the model outputs shape {tuple(out.logits.shape)}, "
                f"but num_classes is {k}; fix --num-classes or the model card"
            )

    # -- forward ---------------------------------------------------------------------------------
    @property
    def _grad(self) -> bool:
        return needs_grad(self._cams)

    def autocast(self):
        """The forward's autocast context: bf16 (else fp16) on CUDA when ``amp``, else nothing."""
        return torch.autocast("cuda", dtype=self._amp_dtype) if self.amp else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, *, targets: torch.Tensor | np.ndarray | None = None, masks=None) -> FusedOutput:
        """Run the fused pass on a normalised batch ``x`` (N, 3, H, W) float (any device).

        ``targets`` (N,) int, when given, are the classes the CAMs explain (instead of ``target``).
        ``masks`` (N, H, W): the regions of a segmentation model's region target ``"mask"``.
        """
        if not self._handles:
            raise RuntimeError("use FusedExtractor as a context manager (with ...:)")
        self._state = {}
        if self._attention is not None:
            self._attention.weights = []
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        prev = torch.is_grad_enabled()
        amp = self.autocast()
        try:
            with amp:
                torch.set_grad_enabled(False)
                logits = self.module(x)
        finally:
            torch.set_grad_enabled(prev)
        if "leaf" not in self._state:
            raise ModelError(f"target layer {self.target_layer!r} was not called in the forward pass")
        if "emb" not in self._state:
            raise ModelError(f"embedding layer {self.embedding_layer!r} was not called in the forward pass")
        leaf = self._state["leaf"]
        seg, class_probs = None, None
        if self.segmentation:  # per-pixel logits: area shares stand for the tile's class scores
            seg, (logits, class_probs) = logits, self._area_logits(logits)
        logits_f = logits.float()
        if targets is not None:
            if isinstance(targets, torch.Tensor):  # any device (the score stage's are on the model's)
                targets = targets.to(device=logits.device, dtype=torch.long)
            else:
                targets = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=logits.device)
        elif self.target == "pred":
            targets = logits_f.detach().argmax(1)
        else:
            targets = torch.full((x.shape[0],), int(self.target), device=logits.device, dtype=torch.long)
        grads = self._target_grads(leaf, seg if seg is not None else logits_f, targets, masks) if self._grad else None
        with torch.no_grad():
            grid = leaf.detach()
            if grid.ndim == 3:  # transformer tokens: the patch grid, class and register tokens dropped
                grid, grads = tokens_to_grid(grid), (tokens_to_grid(grads) if grads is not None else None)
            elif self._state.get("nhwc"):  # a channels-last layer (Swin's norms): (N, h, w, C) -> (N, C, h, w)
                grid, grads = grid.permute(0, 3, 1, 2), (grads.permute(0, 3, 1, 2) if grads is not None else None)
            cams = fused_cams(grid, grads, self._cams)
            if self._attention is not None:
                cams[ROLLOUT] = rollout_maps(self._attention.weights)
            acts = None
            if self.keep_activations:
                a = grid.float()
                acts = (a.clamp(min=0) if a.min() < 0 else a).cpu().numpy()
            out = FusedOutput(
                logits=logits_f.detach().cpu().numpy(),
                embeddings=self._state["emb"].float().flatten(1).cpu().numpy(),
                targets=targets.cpu().numpy(),
                cams={k: v.cpu().numpy() for k, v in cams.items()},
                activations=acts,
                class_probs=None if class_probs is None else class_probs.float().cpu().numpy(),
            )
        self._state = {}
        return out

    __call__ = forward

    @staticmethod
    def _area_logits(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation: (log area shares (N, K), mean probabilities (N, K)) of per-pixel logits."""
        from wsi_explain.explain.segmentation import area_shares

        shares, class_probs = area_shares(seg.detach())
        return torch.log(shares + 1e-6), class_probs

    def _target_grads(self, leaf: torch.Tensor, out: torch.Tensor, targets: torch.Tensor, masks) -> torch.Tensor:
        """d score / d leaf: the target logit, or for per-pixel ``out`` the target class's logit summed
        over its region."""
        with torch.enable_grad():
            if out.ndim == 4:
                from wsi_explain.explain.segmentation import region_masks, region_score

                score = region_score(out, targets, region_masks(out, targets, region=self.region, masks=masks)).sum()
            else:
                score = out.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, leaf)
        return grads

    def normalise(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> normalised float (N, 3, H, W) channels_last on the device.

        One fused multiply-add on the NHWC data (already the channels_last layout): no copies.
        """
        t = torch.as_tensor(images).to(self.device, non_blocking=True)
        if self._norm is None or self._norm[0].device != t.device:
            std = torch.tensor(self.model.card.std, device=t.device)
            mean = torch.tensor(self.model.card.mean, device=t.device)
            self._norm = (1.0 / (255.0 * std), -mean / std)
        scale, shift = self._norm
        out = torch.addcmul(shift, t.float(), scale)  # (N, H, W, 3)
        return out.permute(0, 3, 1, 2)  # a channels_last view
