"""Attribution methods beyond the fused CAMs: one small base class, adapters for captum and
pytorch-grad-cam.

Every :class:`Attributor` takes a normalised batch ``(N, 3, H, W)`` and returns ``(N, H, W)``
float32 maps at input resolution. ``max_batch`` bounds how many images the model sees in one
forward, whatever the method's own expansion (IG's steps, GradientShap's samples, Occlusion's
perturbations, ScoreCAM's masks), so memory stays bounded.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from wsi_explain.explain import segmentation as seg
from wsi_explain.explain.card import LoadedModel, ModelError
from wsi_explain.explain.fused import resolve_device
from wsi_explain.explain.layers import default_target_layer, find_module

__all__ = [
    "Attributor",
    "CaptumAttributor",
    "GradCamAttributor",
    "ATTRIBUTORS",
    "make_attributor",
    "make_explainer",
    "register_attributor",
]

logger = logging.getLogger(__name__)

#: name -> factory(model, **options) -> Attributor
ATTRIBUTORS: dict[str, Callable[..., Attributor]] = {}


def register_attributor(name: str):
    def deco(factory):
        ATTRIBUTORS[name] = factory
        return factory

    return deco


class Attributor(ABC):
    """Batch in, maps out.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    max_batch : int
        Most images the model sees in one forward (memory bound).
    device : str
    """

    name = "attributor"
    #: model inputs one image costs at once (subclasses override)
    expansion = 1

    def __init__(
        self, model: LoadedModel | nn.Module, *, max_batch: int = 32, device: str = "auto", region: str | None = None
    ) -> None:
        # a segmentation net is explained through its region score (wsi_explain.explain.segmentation)
        self.module = seg.as_region_module((model.module if isinstance(model, LoadedModel) else model).eval())
        self.region = region or "predicted"
        self.device = resolve_device(device)
        self.module.to(self.device)
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = int(max_batch)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    seg.predicted_classes(self.module, x[i : i + self.max_batch])
                    for i in range(0, len(x), self.max_batch)
                ]
            )

    _masks: torch.Tensor | None = None  # the current sub-batch's region masks (region "mask")

    def attribute(
        self, inputs: torch.Tensor, *, targets: torch.Tensor | np.ndarray | int | None = None, masks=None
    ) -> np.ndarray:
        """Attribution maps of ``inputs`` for ``targets``.

        Parameters
        ----------
        inputs : (N, 3, H, W) float tensor, normalised as the model expects; not modified.
        targets : (N,) ints, one int for all, or None for the predicted class.
        masks : (N, H, W) bool or float, optional
            The tiles' regions, for a segmentation model explained with ``region="mask"``
            (annotations rasterised to the tiles).

        Returns
        -------
        (N, H, W) float32 NumPy array.
        """
        x = inputs.detach().to(self.device).float()
        if targets is None:
            t = self._predict(x)
        elif isinstance(targets, int):
            t = torch.full((len(x),), targets, dtype=torch.long, device=self.device)
        else:
            t = torch.as_tensor(targets, dtype=torch.long, device=self.device)
        m = None if masks is None else torch.as_tensor(np.asarray(masks)).to(self.device)
        if self.region == "mask" and m is None:
            raise ModelError(f'{self.name}: region "mask" needs the tiles\' masks (masks=...)')
        step = max(1, self.max_batch // max(self.expansion, 1))
        outs = []
        try:
            for i in range(0, len(x), step):
                self._masks = None if m is None else m[i : i + step]
                with torch.enable_grad():  # callers such as captum's sensitivity_max run under no_grad
                    maps = self._attribute(x[i : i + step].clone(), t[i : i + step])
                outs.append(maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.float32(maps))
        finally:
            self._masks = None
        return np.concatenate(outs).astype(np.float32)

    def _region_args(self, x: torch.Tensor, targets: torch.Tensor) -> dict:
        """captum's ``additional_forward_args`` for a segmentation model's region, else {}."""
        return seg.region_args(self.module, x, targets, self.region, masks=self._masks)

    @abstractmethod
    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | np.ndarray:
        """Maps of a sub-batch that fits the memory bound: (n, H, W)."""


class CaptumAttributor(Attributor):
    """A captum method; channels are reduced by ``channel_reduce`` ("sum" or "abs_sum").

    Parameters
    ----------
    method : captum attribution class (Saliency, IntegratedGradients...)
    attribute_kwargs : dict
        Passed to ``method.attribute`` (n_steps, sliding_window_shapes...).
    """

    def __init__(
        self,
        model,
        *,
        method,
        name: str,
        channel_reduce: str = "sum",
        attribute_kwargs=None,
        target_layer=None,
        tile_px=None,
        **kw,
    ) -> None:
        # target_layer and tile_px are accepted (and unused) so every attributor takes the same options
        super().__init__(model, **kw)
        self.name = name
        self.method = method
        self.channel_reduce = channel_reduce
        self.kwargs = dict(attribute_kwargs or {})

    def _reduce(self, a: torch.Tensor) -> torch.Tensor:
        return a.abs().sum(1) if self.channel_reduce == "abs_sum" else a.sum(1)

    def _attribute(self, x, targets):
        algo = self.method(self.module)
        x.requires_grad_(True)  # a private copy (Attributor.attribute clones); gradients are wanted
        return self._reduce(algo.attribute(x, target=targets, **self.kwargs, **self._region_args(x, targets)))


class _GradientShap(CaptumAttributor):
    def _attribute(self, x, targets):
        from captum.attr import GradientShap

        n_samples = int(self.kwargs.get("n_samples", 20))
        stdevs = float(self.kwargs.get("stdevs", 0.0))
        per_call = max(1, self.max_batch // len(x))
        gen = torch.Generator(device="cpu").manual_seed(int(self.kwargs.get("seed", 0)))
        baselines = torch.randn((8,) + tuple(x.shape[1:]), generator=gen).to(x.device) * 0.5
        total, done, extra = None, 0, self._region_args(x, targets)
        algo = GradientShap(self.module)
        # captum samples with torch's and NumPy's global RNGs: seed both, then restore the caller's
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                while done < n_samples:
                    k = min(per_call, n_samples - done)
                    seed = int(self.kwargs.get("seed", 0)) + done
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    a = algo.attribute(x, baselines=baselines, n_samples=k, stdevs=stdevs, target=targets, **extra) * k
                    total = a if total is None else total + a
                    done += k
        finally:
            np.random.set_state(np_state)
        return self._reduce(total / n_samples)


class _Occlusion(CaptumAttributor):
    def _attribute(self, x, targets):
        from captum.attr import Occlusion

        w = int(self.kwargs.get("window", max(x.shape[-1] // 8, 1)))
        stride = int(self.kwargs.get("stride", w))
        per_eval = max(1, self.max_batch // len(x))
        a = Occlusion(self.module).attribute(
            x,
            target=targets,
            sliding_window_shapes=(3, w, w),
            strides=(3, stride, stride),
            perturbations_per_eval=per_eval,
            **self._region_args(x, targets),
        )
        return self._reduce(a)


class _NoiseTunnel(CaptumAttributor):
    def _attribute(self, x, targets):
        from captum.attr import NoiseTunnel, Saliency

        nt = NoiseTunnel(Saliency(self.module))
        n = int(self.kwargs.get("nt_samples", 16))
        return self._reduce(
            nt.attribute(
                x,
                target=targets,
                nt_type=self.kwargs.get("nt_type", "smoothgrad"),
                nt_samples=n,
                nt_samples_batch_size=max(1, self.max_batch // len(x)),
                stdevs=float(self.kwargs.get("stdevs", 0.15)),
                **self._region_args(x, targets),
            )
        )


class GradCamAttributor(Attributor):
    """A pytorch-grad-cam method (ScoreCAM, AblationCAM, EigenGradCAM, FullGrad, ...).

    Its maps come min-max normalised per image and resized to the input, as the library makes
    them. Hooks are released in ``finally`` (the library's ``with`` block swallows IndexError).
    """

    def __init__(
        self, model, *, cam_class, name: str, target_layer: str | None = None, tile_px: int = 224, **kw
    ) -> None:
        super().__init__(model, **kw)
        self.name = name
        self.cam_class = cam_class
        named = getattr(self.module, "net", self.module)  # a segmentation net: its own layer names
        default = seg.segmentation_layer if named is not self.module else default_target_layer
        self.target_layer = target_layer or default(named, tile_px)
        self.layer = find_module(named, self.target_layer)
        if name in ("scorecam", "ablationcam"):
            self.expansion = 1  # their internal batch size is set to max_batch below

    def _attribute(self, x, targets):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        kwargs = {}
        if self.name == "ablationcam":
            kwargs["batch_size"] = self.max_batch
        cam = self.cam_class(model=self.module, target_layers=[self.layer], **kwargs)
        if hasattr(cam, "batch_size") or self.name == "scorecam":
            cam.batch_size = self.max_batch
        try:
            tg = seg.region_targets(self.module, x, targets, self.region, masks=self._masks)
            return cam(input_tensor=x, targets=tg or [ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            cam.activations_and_grads.release()


def _captum(cls_name: str, reduce: str, **defaults):
    def factory(model, *, name: str, attribute_kwargs=None, **kw):
        import captum.attr as ca

        return CaptumAttributor(
            model,
            method=getattr(ca, cls_name),
            name=name,
            channel_reduce=reduce,
            attribute_kwargs={**defaults, **(attribute_kwargs or {})},
            **kw,
        )

    return factory


def _gradcam_family(cls_name: str):
    def factory(model, *, name: str, target_layer=None, tile_px=224, attribute_kwargs=None, **kw):
        import pytorch_grad_cam as pgc

        return GradCamAttributor(
            model, cam_class=getattr(pgc, cls_name), name=name, target_layer=target_layer, tile_px=tile_px, **kw
        )

    return factory


def _deeplift_factory(model, *, name, attribute_kwargs=None, tile_px=224, **kw):
    """DeepLift needs each non-linearity module to be called once per forward (captum's rule):
    checked here, with a clear message, instead of failing in the middle of a run."""
    from captum.attr import DeepLift

    from wsi_explain.explain.layers import trace

    module = model.module if isinstance(model, LoadedModel) else model
    counts: dict[str, int] = {}
    for n, m, _ in trace(module, tile_px):
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh)):
            counts[n] = counts.get(n, 0) + 1
    reused = sorted(n for n, c in counts.items() if c > 1)
    if reused:
        raise ModelError(
            f"DeepLift needs every activation module to be used once per forward; {reused[:5]} are reused "
            "(as in torchvision ResNets). Use integratedgradients or gradientshap instead."
        )
    att = CaptumAttributor(
        model, method=DeepLift, name=name, channel_reduce="sum", attribute_kwargs=attribute_kwargs, **kw
    )
    att.expansion = 2  # inputs and baselines go through the model together
    return att


def _own_class(cls, reduce: str):
    """Factory for the adapters above that subclass CaptumAttributor (their method is built inside)."""

    def factory(model, *, name, attribute_kwargs=None, **kw):
        return cls(model, method=None, name=name, channel_reduce=reduce, attribute_kwargs=attribute_kwargs, **kw)

    return factory


def _ig_factory(model, *, name, attribute_kwargs=None, **kw):
    """Integrated Gradients with per-tile refinement (its own module, which imports this one)."""
    from wsi_explain.explain.integrated_gradients import IntegratedGradientsAttributor

    return IntegratedGradientsAttributor(
        model, method=None, name=name, channel_reduce="sum", attribute_kwargs=attribute_kwargs, **kw
    )


# the built-in methods, registered one way (users add theirs with @register_attributor)
_BUILTIN = {
    "saliency": _captum("Saliency", "abs_sum"),
    "inputxgradient": _captum("InputXGradient", "sum"),
    "integratedgradients": _ig_factory,
    "gradientshap": _own_class(_GradientShap, "sum"),
    "occlusion": _own_class(_Occlusion, "sum"),
    "smoothgrad": _own_class(_NoiseTunnel, "abs_sum"),
    "deeplift": _deeplift_factory,
    "scorecam": _gradcam_family("ScoreCAM"),
    "ablationcam": _gradcam_family("AblationCAM"),
    "eigengradcam": _gradcam_family("EigenGradCAM"),
    "fullgrad": _gradcam_family("FullGrad"),
    "gradcamelementwise": _gradcam_family("GradCAMElementWise"),
    "randomcam": _gradcam_family("RandomCAM"),
}
for _name, _factory in _BUILTIN.items():
    register_attributor(_name)(_factory)


def make_attributor(name: str, model: LoadedModel | nn.Module, **options) -> Attributor:
    """Build the attributor called ``name`` (see :data:`ATTRIBUTORS`)."""
    if name not in ATTRIBUTORS:
        raise ModelError(f"unknown attribution method {name!r}; choose from {sorted(ATTRIBUTORS)}")
    return ATTRIBUTORS[name](model, name=name, **options)


def make_explainer(name: str, model: LoadedModel | nn.Module, *, group=None, **options) -> Attributor:
    """An :class:`Attributor` for any method name: fused CAMs and the registered attributors.

    ``group``: a :class:`~wsi_explain.explain.fused_attributor.FusedCamGroup` shared by the fused
    CAMs scored together (one fused pass per batch for all of them); ignored by other methods.
    """
    from wsi_explain.explain.cams import FUSED_CAMS
    from wsi_explain.explain.fused_attributor import FusedCamAttributor
    from wsi_explain.explain.rollout import ROLLOUT

    if name in FUSED_CAMS or name == ROLLOUT:
        return FusedCamAttributor(model, name=name, group=group, **options)
    return make_attributor(name, model, **options)
