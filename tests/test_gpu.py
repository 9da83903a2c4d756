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
        amp=False,  # autocast has its own test; here the arrays must be the CPU's
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
    from wsi_explain.explain.attributors import make_explainer
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
        # the explainers the score stage recomputes maps with, targets given as a tensor on the device
        cam = make_explainer("gradcam", model, target_layer="layer4", tile_px=64, device=dev)
        cam = cam.attribute(x, targets=t.to(dev))
        out[dev] = (curve, dic, road, cam)
    for a, b in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(b, a, atol=2e-3)


def _synchronising_calls(fn) -> int:
    """How many times ``fn`` waits for the GPU from the host (``.cpu()``, ``.item()``, a device to
    host copy...), counted by torch's sync debug mode, which warns at each of them."""
    import warnings

    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_metrics_on_cuda_wait_for_the_gpu_per_batch_not_per_tile():
    """No host round trip per tile: the host waits for the GPU as often for 16 tiles as for 4 (one
    batch each), while the perturbations, ROAD's imputation and the forwards all run on the device."""
    from wsi_explain import metrics as M
    from wsi_explain.metrics._common import target_probs

    model = load_model("resnet18", num_classes=3).module.eval().cuda()
    counts = {}
    for n in (4, 32):
        x = _batch(n, 64).cuda()
        maps = np.random.default_rng(n).random((n, 7, 7)).astype(np.float32)
        t = torch.zeros(n, dtype=torch.long)
        base = M.make_baseline(x, "blur")
        clean, pb = target_probs(model, x, t), target_probs(model, base, t)

        def score(x=x, maps=maps, base=base, clean=clean, pb=pb):
            kw = dict(targets=0, batch_size=64)
            M.perturbation_curve(model, x, maps, steps=5, baseline=base, clean_probs=clean, baseline_probs=pb, **kw)
            M.confidence_change(model, x, maps, clean_probs=clean, **kw)
            M.road(model, x, maps, percentiles=(30, 70), clean_probs=clean, **kw)

        score()  # warm-up: cuDNN autotuning and first allocations may wait for the device
        counts[n] = _synchronising_calls(score)
    print("host waits for the GPU, per call of the three metrics:", counts)
    # a wait per tile would add 28 or more; the solver may take a few more iterations for more tiles
    assert counts[32] <= counts[4] + 6, counts
