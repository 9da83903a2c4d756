"""Shared perturbation batches (issue 18, point 2): the metrics take the map-independent forwards
from the caller and the fused CAMs scored together share one pass per batch; the values are the
same as each metric and method computed alone, at the counted lower cost."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wsi_explain import metrics as M
from wsi_explain.metrics._common import target_probs


class Counting(nn.Module):
    """Wraps a model and counts the images it is asked to forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += len(x)
        return self.inner(x)


def _known():
    from tests.test_metrics import RegionModel

    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 16, 16, generator=g) + 0.5
    model = Counting(RegionModel().eval())
    maps = np.random.default_rng(2).random((5, 16, 16)).astype(np.float32)
    return model, x, maps


def test_curves_with_the_shared_ends_are_equal_and_forward_only_the_inner_steps():
    model, x, maps = _known()
    t = torch.ones(len(x), dtype=torch.long)
    base = M.make_baseline(x, "blur")
    clean, pb = target_probs(model, x, t), target_probs(model, base, t)
    for mode in ("deletion", "insertion"):
        model.images = 0
        alone = M.perturbation_curve(model, x, maps, targets=1, mode=mode, baseline="blur", steps=7, batch_size=4)
        assert model.images == 8 * len(x)  # every state, ends included
        model.images = 0
        shared = M.perturbation_curve(
            model,
            x,
            maps,
            targets=1,
            mode=mode,
            baseline=base,
            steps=7,
            batch_size=4,
            clean_probs=clean,
            baseline_probs=pb,
        )
        assert model.images == 6 * len(x)  # the inner steps only, in full batches across steps
        np.testing.assert_allclose(shared, alone, atol=1e-6)
    ends = M.perturbation_curve(model, x, maps, targets=1, steps=7, baseline=base, clean_probs=clean, baseline_probs=pb)
    np.testing.assert_array_equal(ends[:, 0], clean)
    np.testing.assert_array_equal(ends[:, -1], pb)


def test_confidence_change_road_and_infidelity_take_the_clean_forward():
    model, x, maps = _known()
    t = torch.ones(len(x), dtype=torch.long)
    clean = target_probs(model, x, t)
    with torch.no_grad():
        soft = torch.softmax(model(x), 1).numpy()
    for how in ("multiply", "mask"):
        a = M.confidence_change(model, x, maps, targets=1, how=how)
        model.images = 0
        b = M.confidence_change(model, x, maps, targets=1, how=how, clean_probs=clean)
        assert model.images == len(x)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-6)
    a = M.road(model, x, maps, targets=1, percentiles=(20, 60))
    model.images = 0
    b = M.road(model, x, maps, targets=1, percentiles=(20, 60), clean_probs=clean)
    assert model.images == 4 * len(x)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6)
    model.images = 0
    a = M.infidelity_score(model, x, maps, targets=1, n_samples=6, max_examples_per_batch=8)
    # captum forwards the clean chunk once per batch of perturbations: here once per chunk
    assert model.images == 6 * len(x) + len(x)
    model.images = 0
    b = M.infidelity_score(model, x, maps, targets=1, n_samples=6, max_examples_per_batch=8, clean_outputs=soft)
    assert model.images == 6 * len(x)
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_fused_cams_scored_together_share_one_pass_per_batch():
    from tests.tiny_models import tiny_cnn
    from wsi_explain.explain.attributors import make_explainer
    from wsi_explain.explain.fused_attributor import FusedCamGroup

    model = tiny_cnn(2).eval()
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = np.array([0, 1, 0, 1, 1, 0])
    x0 = x.clone()
    opts = dict(target_layer="features.9", tile_px=64, max_batch=4)
    methods = ("gradcam", "gradcampp", "hirescam")
    group = FusedCamGroup(model, methods=methods, target_layer="features.9", tile_px=64)
    together = {m: make_explainer(m, model, group=group, **opts) for m in methods}
    alone = {m: make_explainer(m, model, **opts) for m in methods}
    for m in methods:
        np.testing.assert_allclose(together[m].attribute(x, targets=t), alone[m].attribute(x, targets=t), atol=1e-6)
    assert group.passes == 2 and group.images == len(x)  # two sub-batches of 4, for all three methods
    sens = {}
    for m in methods:
        fn = together[m]
        sens[m] = M.sensitivity(lambda z, target=None, f=fn: f.attribute(z, targets=target), x, targets=t, n_samples=3)
        ref = M.sensitivity(
            lambda z, target=None, f=alone[m]: f.attribute(z, targets=target), x, targets=t, n_samples=3
        )
        np.testing.assert_allclose(sens[m], ref, rtol=1e-5, atol=1e-7)
        if m == methods[0]:
            first = group.images
    assert group.images == first  # the second and third methods found every perturbed batch in the memo
    assert torch.equal(x, x0)
    other = make_explainer("gradcam", model, group=group, **opts).attribute(x + 0.1, targets=t)
    assert group.images == first + len(x) and other.shape == (6, 64, 64)  # new inputs: a new pass
