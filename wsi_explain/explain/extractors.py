"""From an extraction config to ready extractors: which methods are fused CAMs and which are
captum attributors, and the model(s) loaded and wrapped (one per ensemble member)."""

from __future__ import annotations

from wsi_explain.core.config import ExtractConfig

__all__ = ["split_methods", "build_extractors", "build_attributors", "method_options"]

#: the attributor whose steps the extraction config sets (``ig_steps``...)
IG = "integratedgradients"


def split_methods(methods) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fused CAM methods, other attribution methods); unknown names raise ModelError."""
    from wsi_explain.explain.attributors import ATTRIBUTORS
    from wsi_explain.explain.cams import FUSED_CAMS
    from wsi_explain.explain.card import ModelError
    from wsi_explain.explain.rollout import ROLLOUT

    fused = {*FUSED_CAMS, ROLLOUT}  # rollout is recorded in the fused pass too
    unknown = [m for m in methods if m not in fused and m not in ATTRIBUTORS]
    if unknown:
        raise ModelError(
            f"unknown method(s) {unknown}; fused CAMs: {sorted(FUSED_CAMS)} and rollout; others: {sorted(ATTRIBUTORS)}"
        )
    return tuple(m for m in methods if m in fused), tuple(m for m in methods if m not in fused)


def build_extractors(cfg: ExtractConfig, tile_px: int):
    """Load the model(s) and wrap them in :class:`FusedExtractor` (validates shapes and layers
    with a dummy forward, before any tile is read)."""
    from wsi_explain.explain.fused import FusedExtractor
    from wsi_explain.explain.load import load_model

    fused, _ = split_methods(cfg.methods)

    weights = [cfg.weights] + list(cfg.ensemble) if cfg.ensemble else [cfg.weights]
    out = []
    for w in weights:
        lm = load_model(
            cfg.arch,
            weights=w,
            num_classes=cfg.num_classes,
            class_names=list(cfg.class_names) if cfg.class_names else None,
            card=cfg.card,
            trust_checkpoint=cfg.trust_checkpoint,
            input_px=tile_px,
        )
        out.append(
            FusedExtractor(
                lm,
                methods=fused,
                target_layer=cfg.target_layer,
                embedding_layer=cfg.embedding_layer,
                target=cfg.target,
                device=cfg.device,
                keep_activations=cfg.activations,
                amp=cfg.amp,
                tile_px=tile_px,
                region="mask" if cfg.region == "annotation" else cfg.region,  # masks from the annotations
            )
        )
    return out


def build_attributors(cfg: ExtractConfig, fx, tile_px: int) -> list:
    """The methods of ``cfg`` outside the fused pass (captum, pytorch-grad-cam), on the extractor
    ``fx``'s model, CAM layer and region target."""
    from wsi_explain.explain.attributors import make_attributor

    _, others = split_methods(cfg.methods)
    opts = dict(max_batch=cfg.attr_max_batch, device=cfg.device, target_layer=fx.target_layer, region=fx.region)
    return [make_attributor(m, fx.model, tile_px=tile_px, **opts, **method_options(cfg, m)) for m in others]


def method_options(cfg: ExtractConfig, method: str, *, fixed: bool = False) -> dict:
    """The options of ``cfg`` that one method's attributor takes (Integrated Gradients: its
    steps, cap and tolerance), so that the extraction and the score stage build it alike.

    ``fixed``: the score stage's form, every tile at ``max(ig_steps, ig_max_steps)`` steps and no
    refinement, so that a map is a continuous function of its tile (sensitivity compares maps of
    perturbed copies, the sanity cascade maps of randomised models, whose completeness does not
    matter) and at least as complete as the extraction's."""
    if method != IG:
        return {}
    if fixed:
        cap = max(cfg.ig_steps, cfg.ig_max_steps)
        return {"attribute_kwargs": {"n_steps": cap, "max_steps": cap, "tolerance": float("inf")}}
    return {"attribute_kwargs": {"n_steps": cfg.ig_steps, "max_steps": cfg.ig_max_steps, "tolerance": cfg.ig_tolerance}}
