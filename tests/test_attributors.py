"""Attribution adapters: every method runs, memory stays bounded, inputs are not mutated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import tiny_cnn
from wsi_explain.explain.attributors import ATTRIBUTORS, Attributor, make_attributor
from wsi_explain.explain.card import ModelError
from wsi_explain.explain.load import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tests.tiny_models:tiny_cnn", num_classes=2)


@pytest.fixture(scope="module")
def x():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


class _MaxBatch:
    """Records the largest batch the model sees (a forward pre-hook)."""

    def __init__(self, module):
        self.max = 0
        self.h = module.register_forward_pre_hook(self)

    def __call__(self, m, inp):
        first = inp[0]
        while isinstance(first, (tuple, list)):
            first = first[0]
        self.max = max(self.max, first.shape[0])

    def close(self):
        self.h.remove()


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_every_method_runs_bounded_and_pure(name, model, x):
    before = x.clone()
    rec = _MaxBatch(model.module)
    try:
        att = make_attributor(name, model, max_batch=4, tile_px=32, device="cpu")
        maps = att.attribute(x, targets=torch.tensor([0, 1, 0, 1, 1]))
    finally:
        rec.close()
    assert maps.shape == (5, 32, 32) and maps.dtype == np.float32 and np.isfinite(maps).all()
    assert rec.max <= 4, f"{name} fed {rec.max} images at once with max_batch=4"
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    assert isinstance(att, Attributor)


def test_integrated_gradients_large_n_steps_small_budget(model, x):
    """captum's IG expands n * n_steps inputs; with max_batch it never holds more than that."""
    from captum.attr import IntegratedGradients

    rec = _MaxBatch(model.module)
    try:
        ours = make_attributor("integratedgradients", model, max_batch=8, attribute_kwargs={"n_steps": 512}).attribute(
            x, targets=1
        )
    finally:
        rec.close()
    assert rec.max <= 8
    ref = IntegratedGradients(model.module).attribute(x, baselines=torch.zeros_like(x), target=1, n_steps=512).sum(1)
    np.testing.assert_allclose(ours, ref.detach().numpy(), atol=1e-5 * float(ref.abs().max()) + 1e-7, rtol=1e-3)


def test_integrated_gradients_checks_its_convergence(model, x, caplog):
    """captum's convergence delta is kept per tile with the steps that gave each map; without
    refinement (max_steps = n_steps) 2 steps leave large completeness errors and a warning that
    names the cap; with refinement (sub-batches of 2, so the diagnostics must stay aligned) every
    tile ends complete or at the cap, the tiles complete at once keep their first map, each refined
    map is captum's IG at that tile's recorded steps, and a tile whose absolute error is below
    ``atol`` is complete whatever its relative error."""
    import logging

    from captum.attr import IntegratedGradients

    before = x.clone()
    kw = {"n_steps": 2, "max_steps": 2, "atol": 0.0}
    few = make_attributor("integratedgradients", model, max_batch=16, attribute_kwargs=kw)
    with caplog.at_level(logging.WARNING, logger="wsi_explain.explain.integrated_gradients"):
        first = few.attribute(x, targets=1)
    f_err, f_delta = few.last_diagnostics["completeness_error"], few.last_diagnostics["completeness_delta"]
    assert f_err.shape == f_delta.shape == (len(x),) and f_err.max() > 0.5  # 2 steps: far from complete
    assert (few.last_diagnostics["n_steps"] == 2).all() and "--ig-max-steps" in caplog.text
    tol = 0.5
    at_once = f_err <= tol
    assert at_once.any() and not at_once.all()  # both kinds of tile in the batch
    fine = make_attributor(
        "integratedgradients", model, max_batch=2, attribute_kwargs={**kw, "max_steps": 256, "tolerance": tol}
    )
    maps = fine.attribute(x, targets=1)
    assert torch.equal(x, before)
    err, steps = fine.last_diagnostics["completeness_error"], fine.last_diagnostics["n_steps"]
    assert ((err <= tol) | (steps == 256)).all()
    assert set(steps.tolist()) <= {2, 4, 8, 16, 32, 64, 128, 256}
    assert (steps[at_once] == 2).all() and (steps[~at_once] > 2).all()
    np.testing.assert_allclose(maps[at_once], first[at_once], rtol=1e-5, atol=1e-7)  # left as they were
    for i in np.flatnonzero(~at_once)[:2]:  # a refined map is IG at its recorded steps
        ref = IntegratedGradients(model.module).attribute(
            x[i : i + 1], baselines=torch.zeros_like(x[i : i + 1]), target=1, n_steps=int(steps[i])
        )
        np.testing.assert_allclose(
            maps[i], ref.sum(1)[0].detach().numpy(), rtol=1e-3, atol=1e-5 * float(ref.abs().max())
        )
    # the absolute floor: tiles within atol are not refined even above the relative tolerance
    atol = float(np.median(f_delta))
    floor = make_attributor(
        "integratedgradients",
        model,
        max_batch=16,
        attribute_kwargs={**kw, "max_steps": 8, "tolerance": 0.01, "atol": atol},
    )
    floor.attribute(x, targets=1)
    refined = floor.last_diagnostics["n_steps"] > 2
    np.testing.assert_array_equal(refined, (f_err > 0.01) & (f_delta > atol))
    assert refined.any() and not refined.all()


def test_gradientshap_splits_samples_exactly(model, x):
    rec = _MaxBatch(model.module)
    try:
        small = make_attributor("gradientshap", model, max_batch=5, attribute_kwargs={"n_samples": 40}).attribute(
            x, targets=0
        )
    finally:
        rec.close()
    assert rec.max <= 5
    rng_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    again = make_attributor("gradientshap", model, max_batch=5, attribute_kwargs={"n_samples": 40}).attribute(
        x, targets=0
    )
    np.testing.assert_array_equal(small, again)  # seeded
    assert torch.equal(rng_state, torch.get_rng_state())  # the caller's RNGs are untouched
    assert np.array_equal(np_state, np.random.get_state()[1])


def test_results_invariant_to_batching(model, x):
    for name in ("saliency", "integratedgradients", "occlusion"):
        a = make_attributor(name, model, max_batch=64).attribute(x, targets=1)
        b = make_attributor(name, model, max_batch=2).attribute(x, targets=1)
        np.testing.assert_allclose(a, b, atol=1e-5 * max(np.abs(a).max(), 1e-6), rtol=1e-4, err_msg=name)


def test_deeplift_refuses_reused_activations():
    with pytest.raises(ModelError, match="DeepLift.*reused"):
        make_attributor("deeplift", load_model("resnet18", num_classes=2), tile_px=64)
    maps = make_attributor("deeplift", tiny_cnn(), tile_px=32).attribute(torch.randn(2, 3, 32, 32), targets=0)
    assert maps.shape == (2, 32, 32)


def test_unknown_method():
    with pytest.raises(ModelError, match="unknown attribution method"):
        make_attributor("telepathy", tiny_cnn())
