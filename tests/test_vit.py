"""Vision transformers: the CAM layer is found (the last block's first norm), tokens become the
patch grid (class and register tokens dropped), and the fused CAMs equal pytorch-grad-cam with the
same ``reshape_transform``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_cams import METHODS, reference_cam
from wsi_explain.explain.fused import FusedExtractor
from wsi_explain.explain.layers import default_classifier, default_target_layer, token_prefix, tokens_to_grid
from wsi_explain.explain.load import load_model

MODELS = {  # entry point -> (CAM layer found by default, prefix tokens)
    "tests.tiny_models:tiny_vit": ("encoder.layers.encoder_layer_1.ln_1", 1),
    "tests.tiny_models:tiny_register_vit": ("blocks.1.norm1", 5),
}


def test_token_prefix_and_grid():
    assert token_prefix(197) == (1, 14) and token_prefix(201) == (5, 14) and token_prefix(49) == (0, 7)
    t = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    g = tokens_to_grid(t)
    # pytorch-grad-cam's reshape_transform for ViTs, written out
    ref = t[:, 1:, :].reshape(2, 4, 4, 3).transpose(2, 3).transpose(1, 2)
    assert g.shape == (2, 3, 4, 4) and torch.equal(g, ref)


def test_default_layers_of_torchvision_vit_b_16():
    lm = load_model("vit_b_16", num_classes=2)
    assert default_target_layer(lm.module, 224) == "encoder.layers.encoder_layer_11.ln_1"
    assert default_classifier(lm.module, 224) == "heads.head"  # its input: the class token


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("target", ["pred", 1])
def test_fused_cams_on_vits_equal_pytorch_grad_cam(arch, target):
    from pytorch_grad_cam.utils.image import scale_cam_image

    layer_name, prefix = MODELS[arch]
    lm = load_model(arch, num_classes=2)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    fx = FusedExtractor(lm, methods=METHODS, target=target, tile_px=64)
    assert fx.target_layer == layer_name
    with fx:
        out = fx(x)
    assert torch.equal(x, before)
    emb_in = {}
    h = dict(lm.module.named_modules())[fx.embedding_layer].register_forward_pre_hook(
        lambda m, i: emb_in.setdefault("x", i[0].detach())
    )
    with torch.no_grad():
        logits = lm.module(x)
    h.remove()
    np.testing.assert_allclose(out.logits, logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(out.embeddings, emb_in["x"].numpy(), atol=1e-5)  # the class token
    layer = dict(lm.module.named_modules())[layer_name]

    def reshape(t):
        n, tok, c = t.shape
        side = int(round((tok - prefix) ** 0.5))
        return t[:, prefix:, :].reshape(n, side, side, c).transpose(2, 3).transpose(1, 2)

    for m in METHODS:
        ref = reference_cam(lm.module, layer, x, out.targets, m, reshape)
        ours = scale_cam_image(scale_cam_image(out.cams[m], (64, 64)))
        assert out.cams[m].shape == (3, 4, 4)
        diff = np.abs(ours - ref).max()
        assert diff <= 1e-4, f"{arch} {m}: max abs difference {diff}"
        if m == "gradcam":
            assert np.ptp(out.cams[m]) > 0  # not a flat map: the patch tokens got gradients


def test_a_vit_runs_through_extraction_and_clustering(slides, tmp_path):
    """The audit with a ViT (class and register tokens): tiles at the model's 64 px, CAMs on the
    4 x 4 patch grid, activations kept on that grid, the class token as embedding, clustered."""
    import pandas as pd
    import zarr

    from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage
    from wsi_explain.core.config import ClusterConfig, ExtractConfig
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.extract import run_extract_stage

    with RunFolder(tmp_path / "run") as run:
        run_tile_stage(run, discover_slides([slides["tiff"]]), TileConfig(tile_px=64, mpp_target=1.0, verify="none"))
        cfg = ExtractConfig(
            arch="tests.tiny_models:tiny_register_vit",
            num_classes=2,
            methods=("gradcam", "hirescam", "rollout"),
            activations=True,
            workers=0,
        )
        assert all(r.status == "done" for r in run_extract_stage(run, cfg))
        run_cluster_stage(run, ClusterConfig(method="kmeans", k=2, pca=8))
    sid = next(p.name for p in (tmp_path / "run/slides").iterdir())
    g = zarr.open_group(str(tmp_path / f"run/slides/{sid}/features.zarr"), mode="r")
    n = int(g["embeddings"].shape[0])
    assert g["embeddings"].shape == (n, 32) and n >= 4
    assert tuple(g["cams/gradcam"].shape) == (n, 4, 4) and tuple(g["activations"].shape[1:]) == (32, 4, 4)
    assert np.ptp(np.asarray(g["cams/gradcam"][:])) > 0 and tuple(g["cams/rollout"].shape) == (n, 4, 4)
    tiles = pd.read_parquet(tmp_path / "run/cohort/tiles.parquet")
    assert len(tiles) == n and set(tiles["cluster"]) <= {0, 1}


def _manual_attention(mha: torch.nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """(N, heads, T, T) softmax(Q K^T / sqrt(d)) from the module's packed projection, by hand."""
    n, t, d = h.shape
    heads = mha.num_heads
    qkv = h @ mha.in_proj_weight.T + mha.in_proj_bias
    q, k, _ = qkv.split(d, dim=-1)
    q = q.reshape(n, t, heads, d // heads).transpose(1, 2)
    k = k.reshape(n, t, heads, d // heads).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_attention_rollout_equals_a_direct_computation(arch):
    """Rollout from the recorded weights equals the product of (0.5 A + 0.5 I), row-normalised,
    with A recomputed by hand from each block's inputs and projection weights; the class token's
    row over the patches, on the grid; no gradient needed; a CNN refuses it clearly."""
    from wsi_explain.explain.card import ModelError
    from wsi_explain.explain.extractors import split_methods

    lm = load_model(arch, num_classes=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fx = FusedExtractor(lm, methods=("gradcam", "rollout"), tile_px=64)
    with fx:
        out = fx(x)
    mhas = [m for m in lm.module.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    inputs = []
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach())) for m in mhas]
    with torch.no_grad():
        lm.module(x)
    for h in hooks:
        h.remove()
    _, prefix = MODELS[arch]
    t = inputs[0].shape[1]
    roll = torch.eye(t).expand(2, t, t)
    for mha, h in zip(mhas, inputs):
        with torch.no_grad():
            a = 0.5 * _manual_attention(mha, h).mean(1) + 0.5 * torch.eye(t)
            roll = (a / a.sum(-1, keepdim=True)) @ roll
    want = roll[:, 0, prefix:].reshape(2, 4, 4).numpy()
    np.testing.assert_allclose(out.cams["rollout"], want, atol=1e-5)
    assert (out.cams["rollout"] > 0).all() and set(out.cams) == {"gradcam", "rollout"}
    assert split_methods(("rollout", "integratedgradients"))[0] == ("rollout",)
    with pytest.raises(ModelError, match="attention rollout needs global self-attention blocks"):
        FusedExtractor(load_model("tests.tiny_models:tiny_cnn", num_classes=2), methods=("rollout",), tile_px=64)


TIMM = {  # timm model -> (default CAM layer, reshape for pytorch-grad-cam)
    "timm:vit_small_patch16_224": ("blocks.11.norm1", "tokens"),
    "timm:vit_small_patch14_reg4_dinov2": ("blocks.11.norm1", "tokens"),
    "timm:swin_tiny_patch4_window7_224": ("norm", "nhwc"),
}


@pytest.mark.parametrize("arch", sorted(TIMM))
def test_timm_transformers_equal_pytorch_grad_cam(arch):
    """timm's ViT, DINOv2-style ViT with registers and Swin (random init, offline): the default layer
    is found, and gradcam, hirescam and eigencam equal pytorch-grad-cam with the usual
    reshape_transform (tokens to grid; Swin's (N, h, w, C) to (N, C, h, w))."""
    pytest.importorskip("timm")
    from pytorch_grad_cam.utils.image import scale_cam_image

    layer_name, kind = TIMM[arch]
    lm = load_model(arch, num_classes=2, tile_px=224)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    methods = ("gradcam", "hirescam", "eigencam")
    fx = FusedExtractor(lm, methods=methods, tile_px=224)
    assert fx.target_layer == layer_name
    with fx:
        out = fx(x)
    layer = dict(lm.module.named_modules())[layer_name]

    def reshape(t):
        if kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        return tokens_to_grid(t)

    for m in methods:
        ref = reference_cam(lm.module, layer, x, out.targets, m, reshape)
        ours = scale_cam_image(scale_cam_image(out.cams[m], (224, 224)))
        diff = np.abs(ours - ref).max()
        assert diff <= 1e-4, f"{arch} {m}: max abs difference {diff}"
    side = 7 if kind == "nhwc" else (14 if "patch16" in arch else 16)
    assert out.cams["gradcam"].shape == (2, side, side) and np.ptp(out.cams["gradcam"]) > 0


def test_timm_names_are_checked():
    from wsi_explain.explain.card import ModelError

    pytest.importorskip("timm")
    with pytest.raises(ModelError, match="timm has no model 'vit_nonexistent'"):
        load_model("timm:vit_nonexistent", num_classes=2)
    with pytest.raises(ModelError, match="attention rollout needs global self-attention blocks"):
        FusedExtractor(
            load_model("timm:swin_tiny_patch4_window7_224", num_classes=2), methods=("rollout",), tile_px=224
        )


@pytest.mark.parametrize("arch", ["timm:vit_small_patch16_224", "timm:vit_small_patch14_reg4_dinov2"])
def test_rollout_on_timm_fused_attention(arch):
    """timm's fused Attention: rollout from the weights read while the blocks run unfused equals a
    hand computation from each block's input and qkv projection; the blocks' fused flag is restored
    and the logits are those of the fused model."""
    pytest.importorskip("timm")
    lm = load_model(arch, num_classes=2, tile_px=224)
    attn = [m for m in lm.module.modules() if type(m).__name__ == "Attention"]
    fused_before = [m.fused_attn for m in attn]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    fx = FusedExtractor(lm, methods=("rollout",), tile_px=224)
    with fx:
        out = fx(x)
    assert [m.fused_attn for m in attn] == fused_before
    inputs = []
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach())) for m in attn]
    with torch.no_grad():
        logits = lm.module(x)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(out.logits, logits.numpy(), atol=1e-4)
    t = inputs[0].shape[1]
    roll = torch.eye(t)[None]
    for m, h in zip(attn, inputs):
        qkv = m.qkv(h).reshape(1, t, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k = m.q_norm(qkv[0]), m.k_norm(qkv[1])
        a = torch.softmax((q * m.scale) @ k.transpose(-2, -1), -1).mean(1)
        a = 0.5 * a + 0.5 * torch.eye(t)
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    prefix = t - (224 // (16 if "patch16" in arch else 14)) ** 2
    side = int(round((t - prefix) ** 0.5))
    want = roll[:, 0, prefix:].reshape(1, side, side).detach().numpy()
    np.testing.assert_allclose(out.cams["rollout"], want, atol=1e-5)
