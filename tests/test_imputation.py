"""ROAD's linear imputation: the batched multigrid solve against pytorch-grad-cam's SciPy LU
(``NoisyLinearImputer``) on real H&E, and ROAD scores against pytorch-grad-cam's with the same
noise draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_explain import metrics as M
from wsi_explain.explain.maps import scale_maps
from wsi_explain.metrics.imputation import linear_impute

DATA = Path(__file__).resolve().parents[1] / "data"
MEAN, STD = 0.5, 0.25


def he_tiles(size: int, n: int) -> torch.Tensor:
    """``n`` normalised (N, 3, size, size) crops from the two real H&E fields."""
    out = []
    for name in ("he_tumour_dense_nuclei.png", "he_breast_glands.png"):
        img = np.asarray(Image.open(DATA / name).convert("RGB"), np.float32) / 255
        for i in range((n + 1) // 2):
            y, x = 37 * i, 53 * i
            out.append(torch.from_numpy((img[y : y + size, x : x + size] - MEAN) / STD).permute(2, 0, 1))
    return torch.stack(out[:n]).contiguous()


def smooth_maps(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """CAM-like maps: random 7 x 7 grids upsampled bilinearly (large, smooth holes when thresholded)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 7, 7, generator=g)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def reference(img: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    return NoisyLinearImputer(noise=0.0)(img, (~removed).float())


@pytest.mark.parametrize("force_torch", [False, True], ids=["cpu-lu", "iterative"])
def test_equals_the_reference_solve_on_real_he(force_torch):
    x = he_tiles(224, 2)
    maps = smooth_maps(2, (224, 224))
    rng = np.random.default_rng(0)
    cases = []
    for i in range(2):
        for p in (20, 50, 80):  # 80 %, 50 % and 20 % of the pixels removed, as ROAD's MoRF cuts them
            cases.append((i, torch.from_numpy(maps[i] >= np.percentile(maps[i], p))))
    cases.append((0, torch.from_numpy(rng.random((224, 224)) < 0.3)))  # scattered single pixels
    imgs = torch.stack([x[i] for i, _ in cases])
    removed = torch.stack([r for _, r in cases])
    before = imgs.clone()
    ours = linear_impute(imgs, removed, force_torch=force_torch)
    assert torch.equal(imgs, before)  # input not modified
    for j, (i, r) in enumerate(cases):
        ref = reference(x[i], r)
        err = (ours[j] - ref).abs().max().item()
        assert err < 1e-3, f"case {j}: max abs difference {err:.2e} from the reference's LU"
        assert torch.equal(ours[j][:, ~r], x[i][:, ~r])  # known pixels untouched
        assert ours[j][:, r].std() > 0.05  # the removed pixels really were filled with the image's values


def test_each_image_is_solved_on_its_own_and_odd_sizes_work():
    x = he_tiles(64, 4)[:, :, :45, :61].contiguous()
    maps = smooth_maps(4, (45, 61), seed=3)
    removed = torch.from_numpy(np.stack([m >= np.percentile(m, 40) for m in maps]))
    whole = linear_impute(x, removed)
    for i in range(4):
        one = linear_impute(x[i : i + 1], removed[i : i + 1])
        np.testing.assert_allclose(one.numpy(), whole[i : i + 1].numpy(), atol=1e-6)
        assert (whole[i] - reference(x[i], removed[i])).abs().max() < 1e-3
    with pytest.raises(ValueError, match="removed must be"):
        linear_impute(x, removed[:, :10])


def test_road_scores_equal_pytorch_grad_cams_with_the_same_noise():
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from tests.tiny_models import tiny_cnn

    model = tiny_cnn(2).eval()
    x = he_tiles(96, 4)
    maps = smooth_maps(4, (96, 96), seed=5)
    pct = (20, 50, 80)
    ours = M.road(model, x, maps, targets=[1, 0, 1, 1], percentiles=pct, seed=11)
    cams = scale_maps(torch.from_numpy(maps)).numpy()
    tg = [ClassifierOutputSoftmaxTarget(c) for c in (1, 0, 1, 1)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)  # one chunk (4 < CHUNK inputs): MoRF's draws, then LeRF's
        morf = ROADMostRelevantFirstAverage(list(pct))(x, cams, tg, model)
        lerf = ROADLeastRelevantFirstAverage(list(pct))(x, cams, tg, model)
        torch.manual_seed(12)  # other draws: the comparison above can tell noise draws apart
        other = ROADMostRelevantFirstAverage(list(pct))(x, cams, tg, model)
    np.testing.assert_allclose(ours["morf"], morf, atol=1e-5)
    np.testing.assert_allclose(ours["lerf"], lerf, atol=1e-5)
    assert np.abs(other - morf).max() > 10 * np.abs(ours["morf"] - morf).max()


def test_road_scores_do_not_depend_on_how_many_chunks_share_a_solve():
    """On a GPU several chunks of CHUNK tiles are imputed in one solve (one wait for the device per
    iteration for all of them); the noise stays drawn per chunk, so the scores are the same."""
    from tests.tiny_models import tiny_cnn
    from wsi_explain.metrics._common import CHUNK

    model = tiny_cnn(2).eval()
    n = 2 * CHUNK + 3  # three chunks, the last one short
    x = he_tiles(48, n)
    before = x.clone()
    maps = smooth_maps(n, (48, 48), seed=2)
    kw = dict(targets=1, percentiles=(25, 75), seed=3)
    one = M.road(model, x, maps, **kw)
    for per_solve in (2, 3):
        grouped = M.road(model, x, maps, chunks_per_solve=per_solve, **kw)
        for k in ("morf", "lerf", "combined"):
            np.testing.assert_allclose(grouped[k], one[k], atol=1e-6, err_msg=f"{k}, {per_solve} chunks per solve")
    assert torch.equal(x, before)


def test_the_multigrid_transfers_keep_constants_at_the_image_edge(monkeypatch):
    """The iterative solver's V-cycle: restriction is the exact transpose of prolongation (so the
    preconditioner is symmetric, as CG needs), prolongation keeps constants up to the image's edge
    (a natural boundary of the system), and so a hole that runs along the edge converges in a few
    iterations (on these 96 px tiles 15 and 17 before the edge was handled, 8 and 11 after) to the
    exact solve."""
    import wsi_explain.metrics.imputation as imp

    for h, w in ((8, 8), (7, 9), (13, 6)):
        hc, wc = (h + 1) // 2, (w + 1) // 2
        g = torch.Generator().manual_seed(h * w)
        e, r = (
            torch.randn(2, hc, wc, generator=g, dtype=torch.float64),
            torch.randn(2, h, w, generator=g, dtype=torch.float64),
        )
        p = imp._bilinear_kernel(e)
        assert torch.allclose((imp._prolong(e, p, (h, w)) * r).sum(), (e * imp._restrict(r, p)).sum(), atol=1e-12)
        assert torch.allclose(imp._prolong(torch.ones_like(e), p, (h, w)), torch.ones(2, h, w, dtype=torch.float64))
    iters = []
    pcg = imp._pcg
    monkeypatch.setattr(imp, "_pcg", lambda *a, **k: iters.append((out := pcg(*a, **k))[1]) or out)
    x = he_tiles(96, 2)
    left = torch.zeros(2, 96, 96, dtype=torch.bool)
    left[:, :, :48] = True  # a hole along three edges
    band = torch.ones(2, 96, 96, dtype=torch.bool)
    band[:, 40] = False  # everything but one row
    for rem in (left, band):
        got = linear_impute(x, rem, force_torch=True)
        assert (got - linear_impute(x, rem)).abs().max() < 1e-3
    assert max(iters) <= 12, iters
