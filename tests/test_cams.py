"""The fused pass equals pytorch-grad-cam, takes no full backward, and is batch-size invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_explain.explain.cams import FUSED_CAMS
from wsi_explain.explain.fused import FusedExtractor
from wsi_explain.explain.load import load_model

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam")


def reference_class(method: str):
    """pytorch-grad-cam's class for one of :data:`METHODS`."""
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM,
        "gradcampp": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "hirescam": pgc.HiResCAM,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
        "segeigencam": pgc.SegEigenCAM,
    }[method]


def reference_cam(module, layer, x, targets, method, reshape_transform=None):
    """pytorch-grad-cam's ``method`` maps of ``x`` for ``targets`` at ``layer`` (hooks released)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = reference_class(method)(model=module, target_layers=[layer], reshape_transform=reshape_transform)
    try:
        return cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_lite0", "mobilenet_v3_small"])
def model_and_batch(request):
    arch = request.param
    lm = load_model(arch, num_classes=1000 if arch == "efficientnet_lite0" else 3)
    px = 128
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, px, px, generator=g)
    return lm, x, px


@pytest.mark.parametrize("target", ["pred", 1])
def test_fused_cams_equal_pytorch_grad_cam(model_and_batch, target):
    from pytorch_grad_cam.utils.image import scale_cam_image

    lm, x, px = model_and_batch
    fx = FusedExtractor(lm, methods=METHODS, target=target, tile_px=px)
    with fx:
        out = fx(x)
    layer = dict(lm.module.named_modules())[fx.target_layer]
    for m in METHODS:
        ref = reference_cam(lm.module, layer, x, out.targets, m)
        # the same normalisation as the reference: scale_cam_image with the input size, then again
        ours = scale_cam_image(scale_cam_image(out.cams[m], (px, px)))
        diff = np.abs(ours - ref).max()
        assert diff <= 1e-4, f"{m}: max abs difference {diff}"


def test_seg_eigen_cam_equals_pytorch_grad_cam(model_and_batch):
    """Seg-Eigen-CAM (``|G| * A``, sign-corrected first component) in the fused pass, beside a
    gradient CAM, equals pytorch-grad-cam's ``SegEigenCAM`` for a class target, and the maps are
    not all zero (the sign rule keeps the larger end positive)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    lm, x, px = model_and_batch
    fx = FusedExtractor(lm, methods=("gradcam", "segeigencam"), tile_px=px)
    with fx:
        out = fx(x)
    layer = dict(lm.module.named_modules())[fx.target_layer]
    ref = reference_cam(lm.module, layer, x, out.targets, "segeigencam")
    assert (out.cams["segeigencam"].reshape(len(x), -1).max(1) > 0).all()
    ours = scale_cam_image(scale_cam_image(out.cams["segeigencam"], (px, px)))
    assert np.abs(ours - ref).max() <= 1e-4


def test_no_backward_through_trunk_or_weights(model_and_batch):
    lm, x, px = model_and_batch
    for p in lm.module.parameters():
        p.grad = None
    seen = []
    fx = FusedExtractor(lm, methods=METHODS, tile_px=px)
    first_conv = next(m for m in lm.module.modules() if isinstance(m, torch.nn.Conv2d))
    h = first_conv.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        with fx:
            fx(x)
    finally:
        h.remove()
    assert seen == [False]  # the trunk ran without autograd
    assert all(p.grad is None for p in lm.module.parameters())
    assert not x.requires_grad


def test_batch_size_invariance_and_no_mutation(model_and_batch):
    lm, x, px = model_and_batch
    before = x.clone()
    fx = FusedExtractor(lm, methods=METHODS, tile_px=px)
    with fx:
        whole = fx(x)
        parts = [fx(x[i : i + 1]) for i in range(len(x))]
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    np.testing.assert_allclose(whole.logits, np.concatenate([p.logits for p in parts]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(whole.embeddings, np.concatenate([p.embeddings for p in parts]), atol=1e-4, rtol=1e-4)
    for m in METHODS:
        a, b = whole.cams[m], np.concatenate([p.cams[m] for p in parts])
        np.testing.assert_allclose(a, b, atol=1e-4 * max(np.abs(a).max(), 1e-6), rtol=1e-3)


def test_hooks_are_removed(model_and_batch):
    lm, x, px = model_and_batch
    fx = FusedExtractor(lm, methods=("gradcam",), tile_px=px)
    with fx:
        fx(x[:1])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.module.modules())
    with pytest.raises(RuntimeError, match="context manager"):
        fx(x[:1])


def test_embedding_is_classifier_input(model_and_batch):
    lm, x, px = model_and_batch
    fx = FusedExtractor(lm, methods=("gradcam",), tile_px=px)
    with fx:
        out = fx(x)
    fc = dict(lm.module.named_modules())[fx.embedding_layer]
    with torch.no_grad():
        logits = fc(torch.from_numpy(out.embeddings))
    np.testing.assert_allclose(logits.numpy(), out.logits, atol=1e-4, rtol=1e-4)


def test_registry_holds_the_six_default_cams_and_each_gives_maps():
    """The extraction's default methods are the six registered CAMs (plus the signed EigenCAM),
    and every registered CAM turns activations and gradients into one (N, h, w) map per tile."""
    from wsi_explain.core.config import ExtractConfig

    assert tuple(ExtractConfig().methods) == METHODS
    assert set(FUSED_CAMS) == set(METHODS) | {"eigencam_signed", "segeigencam"}
    a = torch.rand(3, 8, 5, 5)
    g = torch.randn(3, 8, 5, 5)
    for name, fn in FUSED_CAMS.items():
        out = fn(a, g)
        assert out.shape == (3, 5, 5) and torch.isfinite(out).all() and out.abs().sum() > 0, name


def _activations(shape, act, seed):
    """ReLU / ReLU6 / hard-swish activations, channels of unequal scale (seeded)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    a = {"relu": np.maximum(a, 0), "relu6": np.clip(a * 3, 0, 6), "hardswish": a * np.clip(a + 3, 0, 6) / 6}[act]
    return a * rng.gamma(1.0, 1.0, shape[:2] + (1, 1)).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "act"),
    [
        ((120, 512, 7, 7), "relu"),  # ResNet-18/34 layer4 at 224 px: the LQ route
        ((40, 1280, 7, 7), "relu6"),  # EfficientNet-Lite0's head
        ((200, 576, 4, 4), "hardswish"),  # MobileNetV3-small at 128 px (negative values too)
        ((100, 64, 14, 14), "relu"),
    ],  # fewer channels than 11/6 x positions: the direct SVD
)
def test_eigencam_projection_equals_pytorch_grad_cam_with_its_sign(shape, act):
    """EigenCAM's singular-vector sign is arbitrary and pytorch-grad-cam keeps LAPACK's: our
    cheaper factorisation must give the same maps, sign included, tile for tile."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from wsi_explain.explain.cams import first_component

    a = _activations(shape, act, seed=sum(shape))
    before = a.copy()
    n, c, h, w = shape
    ours = first_component(a.reshape(n, c, h * w).transpose(0, 2, 1)).reshape(n, h, w)
    ref = get_2d_projection(a)
    np.testing.assert_array_equal(a, before)
    scale = np.abs(ref).max(axis=(1, 2))
    err = np.abs(ours - ref).max(axis=(1, 2)) / scale
    assert (err <= 1e-4).all(), f"{(err > 1e-4).sum()} of {n} tiles differ (sign flips: {(err > 1).sum()})"


@pytest.mark.parametrize(
    ("shape", "act"), [((200, 512, 7, 7), "relu"), ((100, 576, 4, 4), "hardswish"), ((50, 64, 14, 14), "relu")]
)
def test_signed_eigencam_equals_pytorch_grad_cam_sign_correction(shape, act):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    a = _activations(shape, act, seed=shape[1])
    before = a.copy()
    ours = FUSED_CAMS["eigencam_signed"](torch.from_numpy(a), None).numpy()
    np.testing.assert_array_equal(a, before)
    ref = get_2d_projection_with_sign_correction(a)
    err = np.abs(ours - ref).max(axis=(1, 2)) / np.abs(ref).max(axis=(1, 2))
    assert (err <= 1e-4).all(), f"{(err > 1e-4).sum()} of {len(a)} tiles differ"


def test_signed_eigencam_is_stable_under_round_off():
    """On activations with no dominant structure (small gaps between singular values), relative
    noise of 1e-6, the round-off of a different forward, must not invert a signed map: its sign
    comes from the map itself, not from the SVD's arithmetic."""
    rng = np.random.default_rng(7)
    a = np.maximum(rng.standard_normal((300, 1280, 7, 7)), 0).astype(np.float32)
    b = a * (1 + 1e-6 * rng.standard_normal(a.shape)).astype(np.float32)
    p, q = (FUSED_CAMS["eigencam_signed"](torch.from_numpy(v), None).numpy().reshape(len(v), -1) for v in (a, b))
    assert ((p * q).sum(1) > 0).all()
    np.testing.assert_allclose(p, q, atol=1e-3 * np.abs(p).max(), rtol=0)


def test_signed_eigencam_in_the_fused_pass(model_and_batch):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    lm, x, px = model_and_batch
    fx = FusedExtractor(lm, methods=("gradcam", "eigencam_signed"), tile_px=px)
    seen = {}
    layer = dict(lm.module.named_modules())[fx.target_layer]
    with fx:
        h = layer.register_forward_hook(lambda m, i, o: seen.update(a=o.detach().clone()))  # returns None
        try:
            out = fx(x)
        finally:
            h.remove()
    ref = np.maximum(get_2d_projection_with_sign_correction(seen["a"].float().numpy()), 0)
    np.testing.assert_allclose(out.cams["eigencam_signed"], ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("shape", [(24, 512, 7, 7), (6, 384, 14, 14), (2, 256, 28, 28)], ids=["7x7", "14x14", "28x28"])
def test_top_eigenvector_by_squaring_equals_eigh(shape):
    """``eigencam_signed``'s GPU route (repeated squaring, products only) against ``eigh`` (its CPU
    route): the same map once the sign rule is applied, on ReLU'd activations of three grid sizes."""
    from wsi_explain.explain.cams import top_eigenvector

    a = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    x = a.flatten(2).transpose(1, 2)
    x = x - x.mean(1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    before = gram.clone()
    evals, evecs = torch.linalg.eigh(gram)
    v, lam = top_eigenvector(gram)
    assert torch.equal(gram, before)
    np.testing.assert_allclose(lam.numpy(), evals[:, -1].numpy(), rtol=1e-10)
    ref = evecs[..., -1] * evals[:, -1:].sqrt()
    ours = v * lam[:, None].sqrt()
    ours = ours * torch.sign((ours * ref).sum(1, keepdim=True))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-8 * ref.abs().max().item())
    zero_v, zero_lam = top_eigenvector(torch.zeros(2, 5, 5, dtype=torch.float64))
    assert not zero_v.any() and not zero_lam.any()
