"""Segmentation networks (FCN, DeepLabV3, LR-ASPP, U-Nets): per-pixel logits ``(N, K, H, W)``
explained through a **region target**, as pytorch-grad-cam's ``SemanticSegmentationTarget``: the
score of class ``k`` on a tile is its logit summed over a region of pixels,

    S_k = sum_p logit_k(p) * mask(p),

where the region is, per tile, the pixels predicted as ``k`` (``region="predicted"``, the default),
the whole tile (``"tile"``), or a given mask (annotation polygons or label masks rasterised to the
tile). The mask is fixed from the unperturbed forward (not differentiated).

What the rest of the pipeline reads as a tile's "logits" is the log of each class's predicted area
share, so its "probabilities" are the area shares (the positive probability of a 2-class model
becomes the positive class's share of the tile's pixels); the mean probability per class is kept
beside them.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_explain.explain.card import ModelError

__all__ = [
    "SegmentationNet",
    "REGIONS",
    "is_segmentation_output",
    "region_masks",
    "area_shares",
    "segmentation_layer",
    "TORCHVISION_SEGMENTATION",
    "RegionScore",
    "RegionProbNet",
    "metric_regions",
    "as_region_module",
    "metric_module",
    "predicted_classes",
    "region_args",
    "region_targets",
]

#: region targets
REGIONS = ("predicted", "tile", "mask")
#: torchvision's segmentation architectures (dict outputs with "out")
TORCHVISION_SEGMENTATION = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
_EPS = 1e-6


def is_segmentation_output(out) -> bool:
    """A dict with "out" (torchvision) or an (N, K, H, W) tensor with H * W > 1."""
    if isinstance(out, dict):
        return "out" in out
    return isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1


class SegmentationNet(nn.Module):
    """A segmentation network giving ``(N, K, H, W)`` logits (torchvision's dict output: its "out";
    the auxiliary head is not used). The wrapped network is ``self.net`` (layer names gain the
    prefix ``net.``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, dict):
            out = out["out"]
        if not (isinstance(out, torch.Tensor) and out.ndim == 4):
            raise ModelError(f"a segmentation network must give (N, K, H, W) logits, got {type(out).__name__}")
        return out


def area_shares(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) predicted area share of each class (argmax per pixel) and (N, K) mean softmax
    probability, of ``seg`` (N, K, H, W) logits."""
    k = seg.shape[1]
    pred = seg.argmax(1)
    share = torch.stack([(pred == c).float().mean((1, 2)) for c in range(k)], 1)
    return share, torch.softmax(seg.float(), 1).mean((2, 3))


def region_masks(
    seg: torch.Tensor, targets: torch.Tensor, *, region: str = "predicted", masks: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, H, W) float region of each tile's target class.

    Parameters
    ----------
    seg : (N, K, H, W) logits (detached here).
    targets : (N,) int64 class per tile.
    region : "predicted" (pixels whose argmax is the target), "tile" (every pixel) or "mask".
    masks : (N, H', W') bool or float, required for ``region="mask"`` (resized to H x W, nearest).
    """
    n, _, h, w = seg.shape
    if region == "predicted":
        return (seg.detach().argmax(1) == targets[:, None, None]).float()
    if region == "tile":
        return torch.ones(n, h, w, device=seg.device)
    if region == "mask":
        if masks is None:
            raise ModelError('region "mask" needs a mask per tile')
        m = torch.as_tensor(masks, device=seg.device).float()
        if m.ndim != 3 or m.shape[0] != n:
            raise ModelError(f"region masks must be (N, H, W) for {n} tiles, got {tuple(m.shape)}")
        if m.shape[1:] != (h, w):
            m = nn.functional.interpolate(m[:, None], size=(h, w), mode="nearest")[:, 0]
        return m
    raise ModelError(f"unknown region {region!r}: one of {REGIONS}")


def region_score(seg: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) the target class's logit summed over the region (``SemanticSegmentationTarget``)."""
    picked = seg.float().gather(1, targets[:, None, None, None].expand(-1, 1, *seg.shape[2:]))[:, 0]
    return (picked * mask).sum((1, 2))


def segmentation_layer(module: nn.Module, tile_px: int = 224) -> str:
    """The default CAM (and embedding) layer of a segmentation network: the last stage of its
    ``backbone`` when it has one (torchvision: ``net.backbone.layer4`` for ResNets), else the
    coarsest feature map of the forward (a U-Net's bottleneck), the last one called at that size."""
    from wsi_explain.explain.layers import trace

    calls = trace(module, tile_px)
    spatial = [(n, o) for n, _, o in calls if o.ndim == 4 and o.shape[2] * o.shape[3] > 1]
    if not spatial:
        raise ModelError("no layer with a spatial (N, C, h, w) output found; name one with --target-layer")
    backbone = [(n, o) for n, o in spatial if ".backbone." in f".{n}." and n.count(".") == 1 + n.startswith("net.")]
    if backbone:
        return backbone[-1][0]
    smallest = min(o.shape[2] * o.shape[3] for _, o in spatial)
    names = [n for n, o in spatial if o.shape[2] * o.shape[3] == smallest]
    return min(names[-1:], key=lambda n: n.count("."))


class RegionScore(nn.Module):
    """A segmentation network as captum sees it: ``forward(x, masks)`` -> (N, K) every class's
    logit summed over each tile's region ``masks`` (N, H, W) (fixed from the unperturbed tiles and
    passed as captum's ``additional_forward_args``, which captum expands with the inputs); without
    masks, the per-pixel logits (pytorch-grad-cam's methods take them with region targets)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        seg = self.net(x)
        return seg if masks is None else (seg.float() * masks[:, None]).sum((2, 3))


def as_region_module(module: nn.Module) -> nn.Module:
    """A :class:`SegmentationNet` wrapped in :class:`RegionScore`; any other module unchanged."""
    return RegionScore(module) if type(module) is SegmentationNet else module


class RegionProbNet(SegmentationNet):
    """What the saliency metrics perturb and read for a segmentation model: ``forward(x, regions)``
    -> (N, K) log of each class's mean softmax probability over each tile's region ``regions``
    (N, H, W) (0/1 or weights; resized to the logits' size, nearest), so that its softmax is the
    region's mean probability of each class, a probability like a classifier's. The region is the
    one the explanation targets, fixed from the unperturbed tile (:func:`metric_regions`): the
    metrics read how much of the region's score survives a perturbation. Without regions, or for
    a tile whose region is empty, the whole tile (its classes' soft area shares). Shares the
    network (and so the layer names) of the :class:`SegmentationNet` it was made from."""

    def forward(self, x: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        prob = torch.softmax(super().forward(x).float(), 1)
        if regions is None:
            return torch.log(prob.mean((2, 3)) + _EPS)
        r = regions.to(device=prob.device, dtype=prob.dtype)
        if r.ndim != 3 or r.shape[0] != len(x):
            raise ModelError(f"regions must be (N, H, W) for {len(x)} tiles, got {tuple(r.shape)}")
        if r.shape[1:] != prob.shape[2:]:
            r = nn.functional.interpolate(r[:, None], size=prob.shape[2:], mode="nearest")[:, 0]
        area = r.sum((1, 2))
        r = torch.where((area > 0)[:, None, None], r, torch.ones_like(r))  # an empty region: the tile
        return torch.log((prob * r[:, None]).sum((2, 3)) / r.sum((1, 2))[:, None] + _EPS)


def metric_module(module: nn.Module) -> nn.Module:
    """The module the metrics call: :class:`RegionProbNet` for a segmentation net, else itself."""
    return RegionProbNet(module.net).eval() if type(module) is SegmentationNet else module


@torch.no_grad()
def metric_regions(
    module: nn.Module,
    x: torch.Tensor,
    targets,
    *,
    region: str | None,
    masks=None,
    batch_size: int = 32,
) -> torch.Tensor | None:
    """(N, H, W) float32 region of each unperturbed tile that the metrics read a segmentation
    model's target probability over (on CPU), or None for a classifier (``region`` None).

    The explanation's own region target (:func:`region_masks` of the unperturbed logits): the
    pixels predicted as the target class (``"predicted"``), the whole tile (``"tile"``) or the
    given ``masks`` (N, H', W') (``"mask"``). ``module``: the :class:`SegmentationNet` (or its
    :class:`RegionProbNet`); ``x`` (N, 3, H, W) normalised tiles; ``targets`` (N,) classes.
    """
    if region is None or not isinstance(module, SegmentationNet):
        return None
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1).expand(len(x))
    dev = next(module.parameters()).device
    out = []
    for s in range(0, len(x), batch_size):
        seg = SegmentationNet.forward(module, x[s : s + batch_size].to(dev))
        m = None if masks is None else torch.as_tensor(masks[s : s + batch_size])
        out.append(region_masks(seg, t[s : s + batch_size].to(dev), region=region, masks=m).cpu())
    return torch.cat(out)


def predicted_classes(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N,) the predicted class: argmax of the logits, or of the area shares for a segmentation net."""
    with torch.no_grad():
        out = module(x)
    return area_shares(out)[0].argmax(1) if isinstance(module, RegionScore) else out.argmax(1)


def region_args(module: nn.Module, x: torch.Tensor, targets: torch.Tensor, region: str, masks=None) -> dict:
    """captum keyword arguments for a :class:`RegionScore` module (the tiles' region masks; ``masks``
    (N, H, W) for ``region="mask"``), else {}."""
    if not isinstance(module, RegionScore):
        return {}
    with torch.no_grad():
        seg = module.net(x)
    return {"additional_forward_args": (region_masks(seg, targets, region=region, masks=masks),)}


def region_targets(module: nn.Module, x: torch.Tensor, targets: torch.Tensor, region: str, masks=None) -> list | None:
    """pytorch-grad-cam targets for a :class:`RegionScore` module (``SemanticSegmentationTarget`` on
    each tile's region; ``masks`` (N, H, W) for ``region="mask"``), else None."""
    if not isinstance(module, RegionScore):
        return None
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    with torch.no_grad():
        masks = region_masks(module.net(x), targets, region=region, masks=masks).cpu().numpy()
    return [SemanticSegmentationTarget(int(t), m) for t, m in zip(targets, masks)]
