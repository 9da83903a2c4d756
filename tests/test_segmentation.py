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
    methods = (*METHODS, "segeigencam")  # Seg-Eigen-CAM: built for segmentation models
    fx = FusedExtractor(lm, methods=methods, target="pred" if region == "predicted" else 1, tile_px=PX, region=region)
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
    for m in methods:
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


def test_captum_methods_take_the_region_target():
    """captum through the adapters explains the region score with the region fixed from the
    unperturbed tile: Saliency equals the autograd gradient of that score, Integrated Gradients
    is complete on it (so every path point used the same region), Occlusion and GradientShap run
    with the masks expanded as captum expands the inputs; a pytorch-grad-cam method takes
    SemanticSegmentationTarget."""
    from wsi_explain.explain.attributors import make_attributor
    from wsi_explain.explain.segmentation import region_masks, region_score

    lm = load_model("lraspp_mobilenet_v3_large", num_classes=3)
    x = torch.randn(2, 3, PX, PX, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        seg = lm.module(x)
    t = torch.tensor([int(c) for c in seg.argmax(1).flatten(1).mode(1).values])
    mask = region_masks(seg, t, region="predicted")

    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(region_score(lm.module(xg), t, mask).sum(), xg)
    sal = make_attributor("saliency", lm, max_batch=8).attribute(x, targets=t.numpy())
    assert np.allclose(sal, g.abs().sum(1).numpy(), rtol=1e-4, atol=1e-6)  # |gradient| summed over RGB
    ig = make_attributor("integratedgradients", lm, max_batch=8, attribute_kwargs={"n_steps": 64})
    maps = ig.attribute(x, targets=t.numpy())
    with torch.no_grad():
        gap = region_score(lm.module(x), t, mask) - region_score(lm.module(torch.zeros_like(x)), t, mask)
    assert np.allclose(maps.reshape(2, -1).sum(1), gap.numpy(), rtol=0.05, atol=1e-3)
    for name in ("occlusion", "gradientshap", "scorecam"):
        out = make_attributor(name, lm, max_batch=8).attribute(x, targets=t.numpy())
        assert out.shape == (2, PX, PX) and np.isfinite(out).all(), name
    # pytorch-grad-cam's methods: the segmentation net's own layer names, the backbone by default
    for layer in (None, "net.backbone.16"):
        sc = make_attributor("scorecam", lm, max_batch=8, target_layer=layer, tile_px=PX)
        assert sc.target_layer == "net.backbone.16" and sc.layer is dict(lm.module.named_modules())["net.backbone.16"]


def test_metrics_read_the_region_target():
    """The metrics' module reads the target class's mean probability over each tile's region
    (fixed from the unperturbed tile): the soft area share without regions or on an empty region,
    the same weights and layer names as the network."""
    from wsi_explain.explain.segmentation import RegionProbNet, metric_module, metric_regions
    from wsi_explain.metrics._common import target_probs

    lm = load_model("lraspp_mobilenet_v3_large", num_classes=3)
    m = metric_module(lm.module)
    assert isinstance(m, RegionProbNet) and m.net is lm.module.net  # the same weights and layer names
    assert {n for n, _ in m.named_modules()} == {n for n, _ in lm.module.named_modules()}
    x = torch.randn(3, 3, PX, PX, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        seg = lm.module(x)
    t = torch.stack([torch.bincount(p.flatten(), minlength=3).argmax() for p in seg.argmax(1)])  # largest area
    soft = torch.softmax(seg, 1)
    assert np.allclose(target_probs(m, x, t), soft.mean((2, 3))[torch.arange(3), t], atol=1e-5)
    regions = metric_regions(m, x, t, region="predicted", batch_size=2)
    assert regions.shape == (3, PX, PX) and torch.equal(regions, (seg.argmax(1) == t[:, None, None]).float())
    regions[2] = 0  # an empty region reads the whole tile
    want = [float((soft[i, t[i]] * regions[i]).sum() / regions[i].sum()) for i in range(2)]
    want.append(float(soft[2, t[2]].mean()))
    assert np.allclose(target_probs(m, x, t, regions=regions), want, atol=1e-5)
    given = torch.zeros(3, PX // 2, PX // 2)
    given[:, :10, :10] = 1  # a given mask, resized to the tile (nearest)
    big = metric_regions(m, x, t, region="mask", masks=given)
    assert big.shape == (3, PX, PX) and int(big[0].sum()) == 400
    clf = load_model("resnet18", num_classes=3)
    assert metric_module(clf.module) is clf.module
    assert metric_regions(clf.module, x, t, region="predicted") is None  # a classifier: no region
    assert metric_regions(m, x, t, region=None) is None


class _OneRegion(torch.nn.Module):
    """A classifier-shaped view of a RegionProbNet that reads every input over one fixed region."""

    def __init__(self, net, region):
        super().__init__()
        self.net, self.region = net, region

    def forward(self, x):
        return self.net(x, self.region.expand(len(x), -1, -1))


class _NearestRegion(torch.nn.Module):
    """Reads each input over the region of the clean tile nearest to it (a perturbed copy's own)."""

    def __init__(self, net, tiles, regions):
        super().__init__()
        self.net, self.tiles, self.regions = net, tiles, regions

    def forward(self, x):
        d = torch.cdist(x.flatten(1), self.tiles.flatten(1))
        return self.net(x, self.regions[d.argmin(1)])


def test_every_faithfulness_metric_reads_each_tiles_own_region():
    """Deletion/insertion, DiC, ROAD and infidelity with ``regions``: each tile's values equal the
    same metric on that tile alone with a model that reads that tile's region (so the regions
    follow their tiles through batching, imputation and captum's expansion), and differ from the
    whole-tile reading."""
    import wsi_explain.metrics as M
    from wsi_explain.explain.segmentation import metric_module, metric_regions

    torch.manual_seed(0)
    m = metric_module(load_model("lraspp_mobilenet_v3_large", num_classes=2).module)
    with torch.no_grad():  # a random-init head is nearly flat: sharpen it so that regions differ
        for conv in (m.net.classifier.low_classifier, m.net.classifier.high_classifier):
            conv.weight.mul_(200.0)
    x = torch.randn(2, 3, PX, PX, generator=torch.Generator().manual_seed(8))
    maps = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(9)).numpy()
    t = torch.tensor([0, 1])
    regions = metric_regions(m, x, t, region="predicted")
    assert all(0.05 < float(r.mean()) < 0.95 for r in regions), regions.mean((1, 2))
    x0 = x.clone()

    def run(model, z, mp, tt, **kw):
        out = {
            "del": M.perturbation_curve(model, z, mp, targets=tt, steps=4, batch_size=3, **kw),
            "ins": M.perturbation_curve(model, z, mp, targets=tt, mode="insertion", steps=4, **kw),
            "dic": M.confidence_change(model, z, mp, targets=tt, how="mask", **kw)["score_perturbed"],
        }
        out.update(
            {f"road_{k}": v for k, v in M.road(model, z, mp, targets=tt, percentiles=(30, 70), noise=0.0, **kw).items()}
        )
        return out

    both = run(m, x, maps, t, regions=regions)
    whole = run(m, x, maps, t)
    for i in range(2):
        alone = run(_OneRegion(m, regions[i : i + 1]), x[i : i + 1], maps[i : i + 1], t[i : i + 1])
        for k, v in alone.items():
            assert np.allclose(both[k][i], v[0], atol=1e-5), (k, i)
    # infidelity on both tiles at once: captum repeats each tile's region with its perturbed copies
    # (a reference model finds each row's tile as the nearest clean tile, and reads its region)
    inf = M.infidelity_score(m, x, maps, targets=t, n_samples=4, max_examples_per_batch=3, regions=regions)
    ref = M.infidelity_score(_NearestRegion(m, x, regions), x, maps, targets=t, n_samples=4, max_examples_per_batch=3)
    assert np.allclose(inf, ref, rtol=1e-4, atol=1e-7)
    assert not np.allclose(inf, M.infidelity_score(m, x, maps, targets=t, n_samples=4), rtol=1e-3)
    assert not np.allclose(both["del"], whole["del"], atol=1e-4)  # the region is not the tile
    assert torch.equal(x, x0)  # inputs not modified


def test_a_perturbation_outside_the_region_leaves_the_score_unchanged():
    """With a per-pixel segmentation net (1 x 1 convolution), the deletion curve read over the
    predicted region stays at the clean probability while only pixels outside the region are
    removed, and falls once the region's own pixels go; read over the whole tile it moves at once."""
    import wsi_explain.metrics as M
    from wsi_explain.explain.segmentation import SegmentationNet, metric_module, metric_regions

    net = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[[[4.0]], [[0.0]], [[0.0]]], [[[-4.0]], [[0.0]], [[0.0]]]]))
        net.bias.zero_()
    m = metric_module(SegmentationNet(net).eval())
    x = torch.full((1, 3, 16, 16), -0.1)  # class 1, weakly (probability of class 0: 0.31) ...
    x[:, :, :, :8] = 1.0  # ... but class 0 on the left half
    t = torch.tensor([0])
    regions = metric_regions(m, x, t, region="predicted")
    assert int(regions.sum()) == 128
    maps = np.zeros((1, 16, 16), np.float32)
    maps[0, :, 8:] = 1.0  # the right half (outside the region) is the most relevant
    base = torch.full_like(x, -1.0)  # a deleted pixel is class 1, surely
    kw = dict(targets=t, baseline=base, steps=4)
    inside = M.perturbation_curve(m, x, maps, regions=regions, **kw)[0]
    tile = M.perturbation_curve(m, x, maps, **kw)[0]
    assert np.allclose(inside[:3], inside[0]) and inside[0] > 0.99 and inside[4] < 0.01
    assert tile[2] < tile[1] - 0.05 < tile[0] - 0.1  # the whole-tile reading drops as soon as the right half goes


@pytest.mark.slow
def test_run_on_the_demo_cohort_with_a_segmentation_model(demo_run, tmp_path):
    """`wsi-explain run` on the demo cohort with torchvision's LR-ASPP (random init, 2 classes):
    every stage finishes; the stored probabilities are area shares; CAMs and captum maps are
    stored; the clusters are scored; the report says what the probabilities mean."""
    import json
    import subprocess
    import sys

    import pandas as pd
    import yaml
    import zarr

    run_dir, proc, _ = demo_run
    assert proc.returncode == 0, proc.stdout[-2000:]
    cfg = {
        "slides": [str(run_dir / "demo_slides" / "cohort.csv")],
        "out": str(tmp_path / "seg"),
        "tile": {"tile_px": 224, "mpp_target": 2.0},
        "extract": {
            "arch": "lraspp_mobilenet_v3_large",
            "num_classes": 2,
            "methods": ["gradcam", "hirescam", "saliency"],
            "attr_sample": 4,
        },
        "score": {
            "methods": ["gradcam", "hirescam"],
            "per_cluster": 4,
            "steps": 8,
            "baselines": ["blur"],
            "road_percentiles": [50],
            "references": ["random"],
            "infidelity_samples": 4,
            "sensitivity_samples": 3,
            "sanity_tiles": 2,
        },
    }
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "run", str(tmp_path / "seg.yaml")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "seg"
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    assert tiles["slide_id"].nunique() == 7
    share = tiles["prob_pos"].to_numpy() * 224 * 224  # a share of the tile's 224 x 224 pixels
    assert (np.abs(share - np.round(share)) < 0.2).all()
    g = zarr.open_group(str(run / "slides" / tiles.slide_id.iloc[0] / "features.zarr"), mode="r")
    assert g.attrs["task"] == "segmentation" and g.attrs["region"] == "predicted"
    assert g.attrs["target_layer"] == "net.backbone.16" and g["class_probs"].shape[1] == 2
    assert "cams/gradcam" in g and "attributions/saliency" in g
    metrics = pd.read_parquet(run / "cohort/cluster_metrics.parquet")
    assert {"deletion_auc_blur", "road_combined"} <= set(metrics["metric"]) and metrics["value"].notna().any()
    meta = json.loads(
        __import__("pyarrow.parquet").parquet.read_schema(run / "cohort/tiles.parquet").metadata[b"wsi_explain"]
    )
    assert meta["task"] == "segmentation"
    html = (run / "report/index.html").read_text()
    assert "The model segments" in html and "mean probability over that same region" in html
