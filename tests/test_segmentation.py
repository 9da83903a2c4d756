"""Segmentation models: torchvision FCN / LR-ASPP (dict outputs) and an entry-point U-Net-like
net, explained through region targets. The fused pass's six CAMs equal pytorch-grad-cam's with
``SemanticSegmentationTarget`` on the same region; the tile's "probabilities" are the classes' area
shares; bad combinations are clear errors before any tile is read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_cams import METHODS, reference_class
from wsi_explain.explain.card import ModelError
from wsi_explain.explain.fused import FusedExtractor
from wsi_explain.explain.load import load_model

PX = 96


@pytest.fixture(scope="module", params=["lraspp_mobilenet_v3_large", "fcn_resnet50"])
def seg_model(request):
    lm = load_model(request.param, num_classes=3)
    x = torch.randn(2, 3, PX, PX, generator=torch.Generator().manual_seed(3))
    return lm, x


def _reference(module, layer, x, targets, masks, method):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    cam = reference_class(method)(model=module, target_layers=[layer])
    try:
        tg = [SemanticSegmentationTarget(int(t), m.astype(np.float32)) for t, m in zip(targets, masks)]
        return cam(input_tensor=x.clone(), targets=tg)
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize("region", ["predicted", "tile"])
def test_region_cams_equal_pytorch_grad_cam(seg_model, region):
    from pytorch_grad_cam.utils.image import scale_cam_image

    lm, x = seg_model
    assert lm.card.task == "segmentation"
    fx = FusedExtractor(lm, methods=METHODS, target="pred" if region == "predicted" else 1, tile_px=PX, region=region)
    assert fx.target_layer.startswith("net.backbone.")
    before = x.clone()
    with fx:
        out = fx(x)
    assert torch.equal(x, before)  # the input is not modified
    with torch.no_grad():
        seg = lm.module(x)
    pred = seg.argmax(1).numpy()
    t = out.targets[:, None, None]
    masks = (pred == t) if region == "predicted" else np.ones_like(pred, bool)
    assert masks.any()
    layer = dict(lm.module.named_modules())[fx.target_layer]
    for m in METHODS:
        ref = _reference(lm.module, layer, x, out.targets, masks, m)
        ours = scale_cam_image(scale_cam_image(out.cams[m], (PX, PX)))
        diff = np.abs(ours - ref).max()
        # a map of ~1e-6 at most (random init, the whole tile's logits) is min-max scaled from
        # float32 round-off: compared at 1e-3 there, at 1e-4 everywhere else
        tol = 1e-4 if out.cams[m].max() > 1e-5 else 1e-3
        assert diff <= tol, f"{m}: max abs difference {diff}"


def test_area_shares_are_the_tile_probabilities(seg_model):
    lm, x = seg_model
    fx = FusedExtractor(lm, methods=("gradcam",), tile_px=PX)
    with fx:
        out = fx(x)
    with torch.no_grad():
        seg = lm.module(x)
    pred = seg.argmax(1).numpy()
    shares = np.stack([(pred == c).mean((1, 2)) for c in range(3)], 1)
    probs = torch.softmax(torch.from_numpy(out.logits), 1).numpy()
    assert np.allclose(probs, shares, atol=1e-4)  # softmax of the stored logits = area shares
    assert (out.targets == shares.argmax(1)).all()  # "pred": the class with the largest area
    assert np.allclose(out.class_probs, torch.softmax(seg, 1).mean((2, 3)).numpy(), atol=1e-5)
    assert out.embeddings.shape[0] == 2 and out.embeddings.ndim == 2  # pooled backbone features
    # results do not depend on the batch: tile by tile gives the same maps
    with fx:
        one = fx(x[:1])
    assert np.allclose(one.cams["gradcam"][0], out.cams["gradcam"][0], rtol=1e-4, atol=1e-5)


def test_a_given_mask_region():
    lm = load_model("lraspp_mobilenet_v3_large", num_classes=3)
    x = torch.randn(1, 3, PX, PX, generator=torch.Generator().manual_seed(4))
    fx = FusedExtractor(lm, methods=("gradcam", "hirescam"), target=2, tile_px=PX, region="mask")
    half = np.zeros((1, PX, PX), bool)
    half[:, :, : PX // 2] = True
    with fx:
        out = fx(x, masks=half)
    layer = dict(lm.module.named_modules())[fx.target_layer]
    from pytorch_grad_cam.utils.image import scale_cam_image

    ref = _reference(lm.module, layer, x, [2], half, "hirescam")
    assert np.abs(scale_cam_image(scale_cam_image(out.cams["hirescam"], (PX, PX))) - ref).max() <= 1e-4
    with pytest.raises(ModelError, match="needs a mask"), fx:
        fx(x)


def test_bad_combinations_are_clear_errors():
    clf = load_model("resnet18", num_classes=3)
    with pytest.raises(ModelError, match="is a classifier.*needs a segmentation model"):
        FusedExtractor(clf, tile_px=64, region="predicted")
    seg = load_model("lraspp_mobilenet_v3_large", num_classes=3)
    with pytest.raises(ModelError, match="unknown region target 'nuclei'"):
        FusedExtractor(seg, tile_px=64, region="nuclei")
    with pytest.raises(ModelError, match="num_classes is 4"):
        from dataclasses import replace

        seg.card = replace(seg.card, num_classes=4, class_names=())
        FusedExtractor(seg, tile_px=64)
