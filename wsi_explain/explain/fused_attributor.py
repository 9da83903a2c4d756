"""Fused CAMs as :class:`~wsi_explain.explain.attributors.Attributor` s, for the metrics.

The metrics recompute maps of the sampled tiles and of perturbed copies of them (sensitivity,
sanity checks). One fused pass gives every CAM of a model at once, so the methods scored together
share a :class:`FusedCamGroup`: the first method that asks for a batch runs the pass for all of
them, and the others find their maps in the group's memo, keyed by the batch's exact content
(captum draws the same seeded perturbations for every method, so the batches are byte-equal).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from wsi_explain.explain.attributors import Attributor
from wsi_explain.explain.card import LoadedModel

__all__ = ["FusedCamGroup", "FusedCamAttributor"]


def _digest(x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor | None) -> tuple:
    """A key for a batch: its shape and a BLAKE2 digest of the inputs', targets' and masks' bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(x.detach().float().contiguous().cpu().numpy().tobytes())
    h.update(targets.detach().to(torch.int64).cpu().numpy().tobytes())
    if masks is not None:
        h.update(b"masks" + torch.as_tensor(masks).detach().float().contiguous().cpu().numpy().tobytes())
    return tuple(x.shape), h.hexdigest()


class FusedCamGroup:
    """Several fused CAMs of one model from one fused pass per batch, memoised by content.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    methods : fused CAM names (and ``"rollout"``) computed together.
    target_layer, tile_px, device, region : as :class:`~wsi_explain.explain.fused.FusedExtractor`.
    max_entries : int
        Batches remembered (least recently used dropped first). An entry holds the methods'
        layer-resolution maps only (e.g. 6 x 32 x 7 x 7 floats), never the inputs.

    Attributes
    ----------
    passes, images : int
        Fused passes run and images they saw (the memo's hits cost neither).
    """

    def __init__(
        self,
        model,
        *,
        methods: tuple[str, ...],
        target_layer: str | None = None,
        tile_px: int = 224,
        device: str = "auto",
        region: str | None = None,
        max_entries: int = 64,
    ) -> None:
        from wsi_explain.explain.fused import FusedExtractor

        lm = model if isinstance(model, LoadedModel) else LoadedModel.wrap(model)
        region = (region or "predicted") if lm.card.task == "segmentation" else None
        self.methods = tuple(dict.fromkeys(methods))
        opts = dict(target_layer=target_layer, device=device, amp=False, tile_px=tile_px, region=region)
        self._fx = FusedExtractor(lm, methods=self.methods, **opts)
        self.max_entries = int(max_entries)
        self._memo: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.passes = self.images = 0

    def cams(self, x: torch.Tensor, targets: torch.Tensor, masks=None) -> dict[str, torch.Tensor]:
        """Layer-resolution maps ``{method: (n, h, w) float32}`` of the batch ``x`` (n, 3, H, W)
        for ``targets`` (n,) (and the regions ``masks`` (n, H, W) of a segmentation model's
        ``region="mask"``), from the memo when this exact batch was seen."""
        key = _digest(x, targets, masks) if self.max_entries > 0 else None
        hit = self._memo.get(key) if key is not None else None
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        with self._fx:
            out = self._fx.forward(x, targets=targets, masks=masks)
        self.passes, self.images = self.passes + 1, self.images + len(x)
        maps = {m: torch.from_numpy(np.ascontiguousarray(out.cams[m])) for m in self.methods}
        if key is not None:
            self._memo[key] = maps
            while len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return maps


class FusedCamAttributor(Attributor):
    """One fused CAM (gradcam, gradcampp, ...) as an :class:`Attributor`: maps for explicit targets,
    bilinearly upsampled from the layer's resolution to the input size (unnormalised, ReLU'd).

    Used where maps of perturbed inputs are needed (metrics, sanity checks); the extraction itself
    keeps the layer-resolution maps. ``group``: a :class:`FusedCamGroup` holding this method,
    shared with the other fused methods scored on the same batches (default: a group of one,
    without memo).
    """

    def __init__(
        self, model, *, name: str, target_layer=None, tile_px: int = 224, group: FusedCamGroup | None = None, **kw
    ) -> None:
        super().__init__(model, **kw)
        self.name = name
        if group is None:
            group = FusedCamGroup(
                model if isinstance(model, LoadedModel) else LoadedModel.wrap(self.module),
                methods=(name,),
                target_layer=target_layer,
                tile_px=tile_px,
                device=str(self.device),
                region=self.region,
                max_entries=0,
            )
        elif name not in group.methods:
            raise ValueError(f"{name!r} is not one of the group's methods {group.methods}")
        self.group = group

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cam = self.group.cams(x, targets, masks=self._masks)[self.name]
        return F.interpolate(cam[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
