"""Saliency metrics: properties on a model whose answer is known, and cross-checks against
pytorch-grad-cam, captum and Quantus on the same model and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsi_explain import metrics as M
from wsi_explain.explain.maps import scale_maps
from wsi_explain.metrics import _common as common

H = W = 16


class RegionModel(nn.Module):
    """logit_1 = sum of the red channel over a known region (weights 0.05), logit_0 = 0.

    With inputs positive on the region, the true relevance of class 1 is weight * input there
    and zero elsewhere, so faithful maps are known."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.zeros(H, W)
        w[2:8, 3:10] = 0.05
        self.register_buffer("w", w)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        l1 = (x[:, 0] * self.w).sum((1, 2)) * self.scale
        return torch.stack([torch.zeros_like(l1), l1], 1)


@pytest.fixture(scope="module")
def known():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, H, W, generator=g) + 0.5  # positive everywhere
    model = RegionModel().eval()
    true = (model.w * x[:, 0]).detach().numpy()  # gradient x input of class 1
    rnd = np.random.default_rng(1).random((6, H, W)).astype(np.float32)
    region = np.broadcast_to((model.w > 0).numpy(), (6, H, W)).copy()
    return model, x, true, rnd, region


def test_deletion_and_insertion_rank_true_map_above_random(known):
    model, x, true, rnd, _ = known
    # a blur keeps a region's sum (this model's evidence), so only the constant baseline separates
    # the maps here; with the blur the curves still start at the unperturbed probability
    blur = M.perturbation_curve(model, x, true, targets=1, baseline="blur", steps=4)
    np.testing.assert_allclose(blur[:, 0], torch.softmax(model(x), 1)[:, 1].detach().numpy(), atol=1e-6)
    assert ((blur >= 0) & (blur <= 1)).all()
    for baseline in ("constant", 0.2):
        d_true = M.curve_auc(M.perturbation_curve(model, x, true, targets=1, baseline=baseline, steps=8))
        d_rnd = M.curve_auc(M.perturbation_curve(model, x, rnd, targets=1, baseline=baseline, steps=8))
        i_true = M.curve_auc(
            M.perturbation_curve(model, x, true, targets=1, baseline=baseline, steps=8, mode="insertion")
        )
        i_rnd = M.curve_auc(
            M.perturbation_curve(model, x, rnd, targets=1, baseline=baseline, steps=8, mode="insertion")
        )
        assert (d_true < d_rnd).all(), baseline
        assert (i_true > i_rnd).all(), baseline


def test_deletion_curve_monotone_where_theory_says_so(known):
    """Every relevant pixel adds a positive amount to logit_1: deleting them to 0 most relevant
    first can only lower the probability, and the end point equals the all-baseline input."""
    model, x, true, _, _ = known
    c = M.perturbation_curve(model, x, true, targets=1, baseline="constant", steps=10)
    assert (np.diff(c, axis=1) <= 1e-7).all()
    np.testing.assert_allclose(c[:, -1], 0.5, atol=1e-6)  # logits 0 and 0
    ins = M.perturbation_curve(model, x, true, targets=1, baseline="constant", steps=10, mode="insertion")
    assert (np.diff(ins, axis=1) >= -1e-7).all()
    np.testing.assert_allclose(ins[:, -1], c[:, 0], atol=1e-6)


def test_metrics_invariant_to_batch_size_and_do_not_mutate(known, monkeypatch):
    model, x, true, rnd, _ = known
    x0, m0 = x.clone(), true.copy()
    a = M.perturbation_curve(model, x, true, targets=1, steps=6, batch_size=1)
    b = M.perturbation_curve(model, x, true, targets=1, steps=6, batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-6)
    c1 = M.confidence_change(model, x, true, targets=1, batch_size=1)
    c2 = M.confidence_change(model, x, true, targets=1, batch_size=5)
    for k in c1:
        np.testing.assert_allclose(c1[k], c2[k], atol=1e-6)
    # ROAD's imputer draws noise per chunk of inputs, seeded by the chunk's first index: scoring the
    # batch whole or in two parts split at a chunk boundary (the second seeded where it starts) gives
    # the same scores. Chunks of 2 here, so that the 6 inputs make three of them
    monkeypatch.setattr(common, "CHUNK", 2)
    r1 = M.road(model, x, rnd, targets=1, percentiles=(20, 60))
    k = 2
    parts = [
        M.road(model, x[:k], rnd[:k], targets=1, percentiles=(20, 60)),
        M.road(model, x[k:], rnd[k:], targets=1, percentiles=(20, 60), seed=k),
    ]
    for key in ("morf", "lerf", "combined"):
        np.testing.assert_allclose(r1[key], np.concatenate([p[key] for p in parts]), atol=1e-6)
    other = M.road(model, x[k:], rnd[k:], targets=1, percentiles=(20, 60))  # another seed: other noise
    assert not np.allclose(other["morf"], r1["morf"][k:], atol=1e-6)
    assert torch.equal(x, x0) and np.array_equal(true, m0)


def test_deletion_agrees_with_quantus_pixel_flipping(known):
    quantus = pytest.importorskip("quantus")
    model, x, true, _, _ = known
    # one input channel (the model reads channel 0 only): Quantus then orders pixels, as we do;
    # distinct values so that both break no ties
    x1 = x[:, :1].contiguous()
    amap = true + np.linspace(0, 1e-4, H * W, dtype=np.float32).reshape(H, W)
    steps = 8
    ours = M.perturbation_curve(model, x1, amap, targets=1, baseline=0.0, steps=steps)
    pf = quantus.PixelFlipping(
        features_in_step=H * W // steps,
        perturb_baseline=0.0,
        normalise=False,
        disable_warnings=True,
        display_progressbar=False,
    )
    ref = np.asarray(
        pf(
            model=model,
            x_batch=x1.numpy(),
            y_batch=np.ones(len(x), int),
            a_batch=amap[:, None],
            device="cpu",
            softmax=True,
            channel_first=True,
        ),
        np.float32,
    )
    np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-5)


def test_confidence_change_agrees_with_pytorch_grad_cam(known):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, true, rnd, _ = known
    for maps in (true, rnd):
        ours = M.confidence_change(model, x, maps, targets=1)
        m01 = scale_maps(torch.from_numpy(maps)).numpy()
        tg = [ClassifierOutputSoftmaxTarget(1)] * len(x)
        np.testing.assert_allclose(ours["drop_abs"], DropInConfidence()(x, m01, tg, model), atol=1e-6)
        np.testing.assert_array_equal(ours["increase"], IncreaseInConfidence()(x, m01, tg, model))
        np.testing.assert_allclose(ours["drop"], ours["drop_abs"] / ours["score"], rtol=1e-5)
    masked = M.confidence_change(model, x, true, targets=1, how="mask", threshold=0.5)
    assert masked["score_perturbed"].shape == (len(x),)
    # keeping only the relevant pixels keeps (or raises) the class score: no drop at all
    assert (masked["drop_abs"] < 0.05).all()


def test_road_agrees_with_pytorch_grad_cam(known):
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, true, rnd, _ = known
    ours = M.road(model, x, true, targets=1, percentiles=(20, 50, 80), seed=7)
    m01 = scale_maps(torch.from_numpy(true)).numpy()
    torch.manual_seed(7)  # one seeded chunk (fewer than 8 inputs), the same noise draws
    ref = ROADCombined(percentiles=[20, 50, 80])(x, m01, [ClassifierOutputSoftmaxTarget(1)] * len(x), model)
    # ROADCombined draws the noise of both orders in a different sequence: 2e-3 tolerance (noise std 0.01)
    np.testing.assert_allclose(ours["combined"], ref, atol=2e-3)
    rnd_score = M.road(model, x, rnd, targets=1, percentiles=(20, 50, 80))
    assert ours["combined"].mean() > rnd_score["combined"].mean()


def test_infidelity_matches_a_hand_computation_and_ranks_maps(known):
    model, x, true, rnd, _ = known
    s, std = 5, 0.1
    ours = M.infidelity_score(
        model, x, true, targets=1, noise_std=std, n_samples=s, seed=3, max_examples_per_batch=None
    )
    # Yeh et al.'s definition with the optimal scale beta (captum's normalize=True), same noise draws
    torch.manual_seed(3)
    xr = x.repeat_interleave(s, 0)
    noise = torch.randn_like(xr) * std
    with torch.no_grad():

        def f(z):
            return torch.softmax(model(z), 1)[:, 1]

        df = (f(xr) - f(xr - noise)).reshape(len(x), s).double()
    a = torch.from_numpy(true)[:, None].expand_as(x).repeat_interleave(s, 0)
    ia = (noise * a).flatten(1).sum(1).reshape(len(x), s).double()
    beta = (ia * df).mean(1) / (ia * ia).mean(1)
    ref = ((beta[:, None] * ia - df) ** 2).mean(1)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-3, atol=1e-9)
    worse = M.infidelity_score(model, x, rnd, targets=1, noise_std=std, n_samples=20, seed=3)
    better = M.infidelity_score(model, x, true, targets=1, noise_std=std, n_samples=20, seed=3)
    assert better.mean() < worse.mean()


def test_sensitivity_agrees_with_captum_and_its_bounds(known):
    from captum.metrics import sensitivity_max

    model, x, true, _, _ = known
    ident = lambda z, target=None: z[:, 0]  # noqa: E731 - the input itself as a "map"
    const = lambda z, target=None: torch.ones(len(z), H, W)  # noqa: E731
    s_id = M.sensitivity(ident, x, targets=1, radius=0.02, n_samples=6, seed=5)
    torch.manual_seed(5)
    ref = sensitivity_max(
        lambda z, target=None: ((z[0] if isinstance(z, tuple) else z)[:, 0].float(),),
        x,
        perturb_radius=0.02,
        n_perturb_samples=6,
        max_examples_per_batch=32,
        target=torch.ones(len(x), dtype=torch.long),
    ).numpy()
    np.testing.assert_allclose(s_id, ref, rtol=1e-5)
    bound = 0.02 * np.sqrt(H * W) / np.linalg.norm(x[:, 0].reshape(len(x), -1).numpy(), axis=1)
    assert (s_id > 0).all() and (s_id <= bound + 1e-6).all()
    assert np.allclose(M.sensitivity(const, x, targets=1), 0)


def test_localisation_and_complexity_agree_with_quantus(known):
    quantus = pytest.importorskip("quantus")
    model, x, true, rnd, region = known
    amap = true + np.linspace(0, 1e-4, H * W, dtype=np.float32).reshape(H, W)
    y, a, sm = np.ones(len(x), int), amap[:, None], region[:, None].astype(np.float32)
    kw = dict(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a, s_batch=sm, device="cpu", channel_first=True)
    pg = quantus.PointingGame(disable_warnings=True)(**kw)
    np.testing.assert_array_equal(M.pointing_game(amap, region), np.asarray(pg, np.float32))
    for maps in (amap, rnd):
        kw["a_batch"] = maps[:, None]
        rma = quantus.RelevanceMassAccuracy(disable_warnings=True)(**kw)
        np.testing.assert_allclose(M.relevance_mass(maps, region), rma, atol=1e-5)
        rra = quantus.RelevanceRankAccuracy(disable_warnings=True)(**kw)
        np.testing.assert_allclose(M.relevance_rank(maps, region), rra, atol=1e-5)
        sp = quantus.Sparseness(disable_warnings=True, normalise=False)(**kw)
        np.testing.assert_allclose(M.gini(maps), sp, atol=1e-4)
        cx = quantus.Complexity(disable_warnings=True, normalise=False)(**kw)
        np.testing.assert_allclose(M.entropy(maps), cx, atol=1e-4)
    assert M.pointing_game(true, region).mean() == 1.0
    assert M.relevance_mass(true, region).mean() > M.relevance_mass(rnd, region).mean()


def test_localisation_edge_cases_and_grades():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 1, 1] = maps[1, 3, 3] = 1.0
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # the second mask is empty
    assert M.pointing_game(maps, masks)[0] == 1.0 and np.isnan(M.pointing_game(maps, masks)[1])
    iou = M.iou_coverage(maps, masks, threshold=0.5)
    assert iou["iou"][0] == pytest.approx(0.25) and iou["coverage"][0] == pytest.approx(0.25)
    assert iou["precision"][0] == 1.0 and np.isnan(iou["iou"][1])
    labels = np.zeros((2, 4, 4), int)
    labels[0, 1, 1] = 5
    labels[1, 3, 3] = 3
    g = M.graded_hit(maps, labels, grades={5: 3, 4: 2, 3: 1, 0: -1})
    np.testing.assert_array_equal(g, [3, 1])
    # low-resolution maps are resized to the mask
    assert M.pointing_game(np.eye(2, dtype=np.float32)[None] * [[[1, 0], [0, 0]]], masks[:1, :, :]).tolist() == [1.0]


def test_gini_and_entropy_extremes():
    flat = np.ones((1, 8, 8))
    peak = np.zeros((1, 8, 8))
    peak[0, 3, 4] = 1
    assert M.gini(flat)[0] == pytest.approx(0, abs=1e-6) and M.gini(peak)[0] > 0.95
    assert M.entropy(flat)[0] == pytest.approx(np.log(64), rel=1e-6) and M.entropy(peak)[0] == pytest.approx(
        0, abs=1e-6
    )
    region = np.zeros((1, 8, 8), bool)
    region[0, :4] = True
    assert M.mass_share(peak, region)[0] == 1.0 and M.mass_share(flat, region)[0] == 0.5


def test_sanity_check_passes_gradcam_and_fails_an_input_only_method():
    from tests.tiny_models import tiny_cnn
    from wsi_explain.explain.attributors import make_explainer

    model = tiny_cnn(2).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = np.array([0, 1, 0, 1])
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def gradcam(mod, z, targets):
        return make_explainer("gradcam", mod, target_layer="features.9", tile_px=64).attribute(z, targets=targets)

    def edges(mod, z, targets):  # depends on the input only
        g = z.mean(1)
        return (g[:, 1:, 1:] - g[:, :-1, 1:]).abs().numpy()

    steps = M.cascading_randomisation(model, gradcam, x, targets=t, seed=0)
    assert [s["block"] for s in steps] == ["fc", "features"]  # top-level blocks with parameters, output end first
    assert np.nanmean(steps[-1]["spearman"]) < 0.5
    fixed = M.cascading_randomisation(model, edges, x, targets=t)
    assert np.allclose(fixed[-1]["spearman"], 1) and np.allclose(fixed[-1]["ssim"], 1, atol=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in w0.items())  # the model is untouched


def test_ensemble_spread_and_relations():
    probs = np.array([[[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]], [[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]]])
    std = np.stack([np.full((2, 2), 0.3), np.zeros((2, 2))])
    s = M.ensemble_spread(probs, std, positive=1, labels=np.array([1.0, np.nan]))
    np.testing.assert_allclose(s["prob_mean"], [0.6, 0.9], atol=1e-6)
    np.testing.assert_allclose(s["attn_std"], [0.3, 0.0], atol=1e-6)
    assert s["acc_mean"][0] == pytest.approx(2 / 3) and s["acc_std"][0] == pytest.approx(np.std([1, 1, 0]))
    assert np.isnan(s["acc_mean"][1])
    x = np.linspace(0, 1, 30)
    fit = M.fit_spread_relations(0.2 - 0.3 * (x - 0.5) ** 2, x, x / 2)
    np.testing.assert_allclose(fit["attn_std~acc_mean"]["coef"], [-0.3, 0.3, 0.125], atol=1e-9)
    assert fit["attn_std~acc_mean"]["r2"] == pytest.approx(1.0)
    assert (
        fit["attn_std~acc_std"]["n"] == 30 and abs(fit["attn_std~acc_std"]["r2"]) < 1e-9
    )  # symmetric: no linear trend


def test_cluster_removal_moves_the_slides_that_rest_on_it():
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    rows = []
    for sid, lab, shortcut in (("a", 1, True), ("b", 1, False), ("c", 0, True), ("d", 0, False)):
        rows += [{"slide_id": sid, "cluster": c, "prob_pos": 0.3 + 0.4 * lab} for c in (0, 2) for _ in range(10)]
        if shortcut:
            rows += [{"slide_id": sid, "cluster": 1, "prob_pos": 0.99} for _ in range(5)]
    tiles = pd.DataFrame(rows)
    before = tiles.copy()
    labels = pd.Series({"a": 1, "b": 1, "c": 0, "d": 0})
    per_slide, per_cluster = M.cluster_removal(tiles, slide_labels=labels, topk=3)
    pd.testing.assert_frame_equal(tiles, before)
    top = per_cluster.iloc[0]
    assert top["cluster"] == 1 and top["n_slides"] == 2  # the shortcut cluster moves the scores most
    row = per_slide[(per_slide.cluster == 1) & (per_slide.slide_id == "c")].iloc[0]
    assert row["topk_before"] == pytest.approx(0.99) and row["topk_after"] == pytest.approx(0.3)
    base = M.slide_scores(tiles, topk=3)
    assert top["auc_topk_before"] == pytest.approx(roc_auc_score(labels[base.index], base["topk"]))
    assert top["auc_topk_after"] == 1.0 and top["d_auc_topk"] > 0


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 1.0, 400)
    m, lo, hi, n = M.bootstrap_ci(np.append(v, np.nan), seed=1)
    assert n == 400 and lo < m < hi and lo < 1.0 < hi
    _, lo2, hi2, _ = M.bootstrap_ci(v[:40], seed=1)
    assert hi2 - lo2 > hi - lo
    assert np.isnan(M.bootstrap_ci([np.nan])[0]) and M.bootstrap_ci([2.0])[1:] == (2.0, 2.0, 1)
