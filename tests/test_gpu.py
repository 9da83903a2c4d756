"""The CUDA paths: the fused pass, autocast, and the extraction stage on a GPU equal the CPU's.

They need a CUDA device and are skipped without one (this project's CPU machines and CI); on a GPU
machine run them alone with ``.venv/bin/python -m pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import copy_run
from wsi_explain import RunFolder
from wsi_explain.core.config import ExtractConfig
from wsi_explain.explain.fused import FusedExtractor
from wsi_explain.explain.load import load_model
from wsi_explain.explain.maps import scale_maps
from wsi_explain.stages.extract import STATUS_OK, run_extract_stage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "eigencam_signed")


def _batch(n=8, px=128):
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(3))


def _pass(device: str, x: torch.Tensor, **kw):
    # a fresh load per device: the extractor moves its module (seeded init: the same weights)
    fx = FusedExtractor(
        load_model("resnet18", num_classes=3), methods=METHODS, device=device, tile_px=x.shape[-1], **kw
    )
    with fx:
        return fx(x)


@pytest.fixture(autouse=True)
def _exact_matmul():
    """TF32 would make CUDA differ from the CPU by ~1e-3 for reasons that are not ours."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def test_fused_pass_on_cuda_equals_cpu():
    x = _batch()
    cpu, gpu = _pass("cpu", x), _pass("cuda", x, amp=False)
    np.testing.assert_allclose(gpu.logits, cpu.logits, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(gpu.embeddings, cpu.embeddings, atol=1e-3, rtol=1e-3)
    np.testing.assert_array_equal(gpu.targets, cpu.targets)
    for m in METHODS:
        a, b = scale_maps(cpu.cams[m]), scale_maps(gpu.cams[m])
        if m == "eigencam":  # the reference's LAPACK sign may differ where round-off differs
            same = np.abs(a - b).max(axis=(1, 2)) <= 1e-3
            assert same.mean() >= 0.75, f"eigencam: {same.sum()} of {len(a)} maps agree"
        else:
            np.testing.assert_allclose(b, a, atol=1e-3, err_msg=m)


def test_autocast_keeps_predictions_and_maps():
    """bf16/fp16 autocast (the CUDA default) against float32 on the same GPU."""
    x = _batch(16)
    full, amp = _pass("cuda", x, amp=False), _pass("cuda", x, amp=True)
    assert (full.logits.argmax(1) == amp.logits.argmax(1)).mean() >= 0.9
    for m in ("gradcam", "hirescam", "eigencam_signed"):
        a, b = (scale_maps(o.cams[m]).reshape(len(x), -1) for o in (full, amp))
        corr = [np.corrcoef(p, q)[0, 1] for p, q in zip(a, b) if p.std() > 0 and q.std() > 0]
        assert np.median(corr) > 0.95, f"{m}: median correlation {np.median(corr):.3f}"


def test_extract_stage_on_cuda_equals_cpu(tiled, tmp_path):
    """Worker processes with pinned memory (the CUDA default) feeding the GPU give the CPU's arrays."""
    base = dict(
        arch="tests.tiny_models:tiny_cnn",
        num_classes=2,
        methods=("gradcam", "hirescam", "eigencam_signed"),
        batch_size=16,
        chunk_tiles=64,
        workers=2,
    )
    arrays = {}
    for device in ("cpu", "cuda"):
        run_dir = copy_run(tiled, tmp_path / device)
        with RunFolder(run_dir) as run:
            res = run_extract_stage(run, ExtractConfig(device=device, **base))
        assert res[0].status == "done"
        g = zarr.open_group(str(run_dir / "slides/generic/features.zarr"), mode="r")
        assert (np.asarray(g["status"][:]) == STATUS_OK).all()
        arrays[device] = {k: np.asarray(g[k][:], dtype=np.float32) for k in ("embeddings", "logits", "cams/gradcam")}
    for k, v in arrays["cpu"].items():
        np.testing.assert_allclose(arrays["cuda"][k], v, atol=2e-3, rtol=2e-3, err_msg=k)


def test_eigencam_signed_runs_on_the_device():
    a = torch.relu(torch.randn(16, 512, 7, 7, generator=torch.Generator().manual_seed(4)))
    from wsi_explain.explain.cams import FUSED_CAMS

    out = FUSED_CAMS["eigencam_signed"](a.cuda(), None)
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), FUSED_CAMS["eigencam_signed"](a, None).numpy(), atol=1e-4, rtol=1e-4)


def test_metrics_on_cuda_equal_cpu():
    """The score stage's metrics with the model on the GPU (perturbed inputs built there, ROAD's
    imputation by the batched multigrid CG) equal the CPU's, shared inputs included."""
    from wsi_explain import metrics as M
    from wsi_explain.metrics._common import target_probs

    x = _batch(6, 64)
    maps = np.random.default_rng(0).random((6, 7, 7)).astype(np.float32)
    out = {}
    for dev in ("cpu", "cuda"):
        model = load_model("resnet18", num_classes=3).module.eval().to(dev)
        t = torch.zeros(6, dtype=torch.long)
        base = M.make_baseline(x, "blur")
        clean, pb = target_probs(model, x, t), target_probs(model, base, t)
        curve = M.perturbation_curve(
            model, x, maps, targets=0, steps=5, baseline=base, clean_probs=clean, baseline_probs=pb
        )
        dic = M.confidence_change(model, x, maps, targets=0, clean_probs=clean)["drop"]
        road = M.road(model, x, maps, targets=0, percentiles=(30, 70), clean_probs=clean)["combined"]
        out[dev] = (curve, dic, road)
    for a, b in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(b, a, atol=2e-3)
