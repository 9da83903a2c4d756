"""The extraction stage on real generated slides: outputs, per-tile problems, resume, ensembles."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import copy_run
from tests.tiny_models import tiny_cnn
from wsi_explain import RunFolder, read_tile_table
from wsi_explain.core.config import ExtractConfig
from wsi_explain.explain.card import ModelError
from wsi_explain.io.features import read_cams
from wsi_explain.stages.extract import STATUS_NONFINITE, STATUS_OK, STATUS_READ_ERROR, run_extract_stage

REPO = Path(__file__).resolve().parents[1]
TINY = "tests.tiny_models:tiny_cnn"


@pytest.fixture()
def run_dir(tiled, tmp_path):
    return copy_run(tiled, tmp_path / "run")


def _cfg(**kw):
    base = dict(
        arch=TINY, num_classes=2, methods=("gradcam", "hirescam", "eigencam"), workers=0, batch_size=16, chunk_tiles=64
    )
    base.update(kw)
    return ExtractConfig(**base)


def _arrays(store):
    g = zarr.open_group(str(store), mode="r")
    out = {}

    def visit(prefix, grp):
        for k in grp.array_keys():
            out[prefix + k] = np.asarray(grp[k][:])
        for k in grp.group_keys():
            visit(prefix + k + "/", grp[k])

    visit("", g)
    return out


def test_outputs_match_a_direct_forward(run_dir):
    with RunFolder(run_dir) as run:
        [res, _] = run_extract_stage(run, _cfg(workers=2))
    assert res.status == "done" and res.n_read_errors == 0
    store = run_dir / "slides/generic/features.zarr"
    g = zarr.open_group(str(store), mode="r")
    tiles, meta = read_tile_table(run_dir / "slides/generic/tiles.parquet")
    n = len(tiles)
    assert g["embeddings"].shape == (n, 64) and g["logits"].shape == (n, 2) and g["cams/gradcam"].shape == (n, 4, 4)
    assert np.asarray(g["done"][:]).all() and (np.asarray(g["status"][:]) == STATUS_OK).all()
    assert g.attrs["target_layer"] == "features" and g.attrs["embedding_layer"] == "fc"
    # recompute 5 tiles directly from the slide and compare
    import tiling
    from wsi_explain.explain.fused import FusedExtractor
    from wsi_explain.explain.load import load_model

    fx = FusedExtractor(load_model(TINY, num_classes=2), methods=("gradcam", "hirescam", "eigencam"), tile_px=32)
    idx = np.array([0, 3, n // 2, n - 2, n - 1])
    with tiling.OpenSlideReader(meta["slide_path"]) as r:
        imgs = np.stack([tiling.read_tile(r, tiles.iloc[i]) for i in idx])
    with fx:
        out = fx(fx.normalise(imgs))
    np.testing.assert_allclose(np.asarray(g["logits"][:])[idx], out.logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g["embeddings"][:])[idx], out.embeddings, atol=1e-5)
    for m in ("gradcam", "hirescam", "eigencam"):
        raw = read_cams(g, m, idx)
        np.testing.assert_allclose(raw, out.cams[m], rtol=2e-3, atol=1e-3 * out.cams[m].max())


def test_exported_program_extracts_like_the_eager_model(run_dir, tiled, tmp_path):
    """``--model export --weights m.pt2``: the extraction stage on a torch.export program of the
    tiny CNN stores the same logits, embeddings and CAMs as on the eager model (<= 1e-4)."""
    m = tiny_cnn(2).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, str(tmp_path / "tiny.pt2"))
    eager = copy_run(tiled, tmp_path / "eager")
    with RunFolder(run_dir) as run:
        res = run_extract_stage(run, _cfg(arch="export", weights=str(tmp_path / "tiny.pt2")))
    with RunFolder(eager) as run:
        run_extract_stage(run, _cfg())
    assert all(r.status == "done" for r in res)
    for sid in ("generic", "corrupt_middle"):
        a, b = _arrays(run_dir / "slides" / sid / "features.zarr"), _arrays(eager / "slides" / sid / "features.zarr")
        ok = b["status"] == STATUS_OK
        assert np.array_equal(a["status"], b["status"])
        for k in ("logits", "embeddings", "cams/gradcam", "cams/hirescam", "cams_scale/gradcam"):
            np.testing.assert_allclose(a[k][ok].astype(np.float32), b[k][ok].astype(np.float32), atol=1e-3, rtol=1e-3)


def test_decode_failures_are_per_tile(run_dir):
    with RunFolder(run_dir) as run:
        res = {r.slide_id: r for r in run_extract_stage(run, _cfg())}
    r = res["corrupt_middle"]
    assert r.status == "done" and 0 < r.n_read_errors < r.n_tiles
    status = np.asarray(zarr.open_group(str(run_dir / "slides/corrupt_middle/features.zarr"), mode="r")["status"][:])
    assert (status == STATUS_READ_ERROR).sum() == r.n_read_errors and (status == STATUS_OK).any()
    rec = json.loads((run_dir / "manifest.json").read_text())["stages"]["extract"]["slides"]["corrupt_middle"]
    assert rec["n_read_errors"] == r.n_read_errors
    assert any("corrupt_middle.tif" in p and "decode" in p for p in rec["problems"])
    shown = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "status", str(run_dir)], capture_output=True, text=True, cwd=REPO
    )
    assert shown.returncode == 0 and f"{len(rec['problems'])} problem(s)" in " ".join(shown.stdout.split())


def test_nonfinite_outputs_are_reported(run_dir, monkeypatch):
    import tiling
    from tests.tiny_models import NaNOnBright

    tiles, meta = read_tile_table(run_dir / "slides/generic/tiles.parquet")
    with tiling.OpenSlideReader(meta["slide_path"]) as r:
        imgs = np.stack([tiling.read_tile(r, row) for _, row in tiles.iterrows()]).astype(np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    brightness = ((imgs - mean) / std).mean((1, 2, 3))
    monkeypatch.setattr(NaNOnBright, "threshold", float(np.median(brightness)))  # half the tiles give NaN
    with RunFolder(run_dir) as run:
        [r, _] = run_extract_stage(run, _cfg(arch="tests.tiny_models:nan_on_bright"))
    g = zarr.open_group(str(run_dir / "slides/generic/features.zarr"), mode="r")
    status = np.asarray(g["status"][:])
    assert r.n_nonfinite == (status == STATUS_NONFINITE).sum() > 0
    assert (status == STATUS_OK).any()
    assert any("non-finite" in p for p in r.problems)


def test_rerun_is_a_noop(run_dir):
    cfg = _cfg()
    with RunFolder(run_dir) as run:
        run_extract_stage(run, cfg, slide_ids=["generic"])
    before = _arrays(run_dir / "slides/generic/features.zarr")
    stamp = (run_dir / "slides/generic/features.zarr/zarr.json").stat().st_mtime_ns
    with RunFolder(run_dir) as run:
        [r] = run_extract_stage(run, cfg.model_copy(update={"batch_size": 5, "workers": 1}), slide_ids=["generic"])
    assert r.status == "skipped"  # batch size and workers do not change results
    assert (run_dir / "slides/generic/features.zarr/zarr.json").stat().st_mtime_ns == stamp
    after = _arrays(run_dir / "slides/generic/features.zarr")
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_model_errors_stop_before_any_tile(run_dir):
    with RunFolder(run_dir) as run:
        with pytest.raises(ModelError, match="outputs shape \\(1, 2\\).*num_classes is 3"):
            run_extract_stage(run, _cfg(num_classes=3, arch="tests.tiny_models:fixed_two_classes"))
        with pytest.raises(ModelError, match="no layer named 'layer4'"):
            run_extract_stage(run, _cfg(target_layer="layer4"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "extract" not in manifest["stages"] or not manifest["stages"]["extract"]["slides"]
    assert not (run_dir / "slides/generic/features.zarr").exists()


def test_ensemble_mean_and_spread(run_dir, tmp_path):
    paths = []
    for seed in (1, 2, 3):
        m = tiny_cnn()
        torch.manual_seed(seed)  # after tiny_cnn, which seeds its own init
        for p in m.parameters():
            p.data += 0.05 * torch.randn_like(p)
        paths.append(tmp_path / f"m{seed}.pt")
        torch.save(m.state_dict(), paths[-1])
    cfg = _cfg(weights=str(paths[0]), ensemble=tuple(map(str, paths[1:])))
    with RunFolder(run_dir) as run:
        run_extract_stage(run, cfg, slide_ids=["generic"])
    a = _arrays(run_dir / "slides/generic/features.zarr")
    probs = a["ensemble/probs"]
    assert probs.shape[1:] == (3, 2)
    np.testing.assert_allclose(a["ensemble/probs_mean"], probs.mean(1), atol=1e-6)
    np.testing.assert_allclose(a["ensemble/probs_std"], probs.std(1), atol=1e-6)
    assert a["ensemble/probs_std"].max() > 1e-4
    assert a["ensemble/cams/gradcam_mean"].max() <= 1.0 + 1e-3 and a["ensemble/cams/gradcam_std"].max() > 0
    # the main arrays are the first model's
    e = np.exp(a["logits"] - a["logits"].max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), probs[:, 0], atol=1e-5)


def test_activations_and_other_methods(run_dir, caplog):
    import logging

    from wsi_explain.explain.integrated_gradients import IG_ATOL

    cfg = _cfg(activations=True, methods=("gradcam", "saliency", "integratedgradients"), attr_sample=6, attr_px=8)
    with caplog.at_level(logging.INFO, logger="wsi_explain.stages.extract"), RunFolder(run_dir) as run:
        run_extract_stage(run, cfg, slide_ids=["generic"])
    assert "GB before compression" in caplog.text  # the size is said before the run
    g = zarr.open_group(str(run_dir / "slides/generic/features.zarr"), mode="r")
    assert g["activations"].shape[1:] == (64, 4, 4) and g["activations"].dtype == np.float16
    assert np.asarray(g["activations"][:5]).min() >= 0
    for m in ("saliency", "integratedgradients"):
        ids = np.asarray(g[f"attributions/{m}/tile_ids"][:])
        maps = np.asarray(g[f"attributions/{m}/maps"][:])
        assert len(ids) == 6 and maps.shape == (6, 8, 8) and np.isfinite(maps).all() and np.abs(maps).max() > 0
    # Integrated Gradients' completeness error and steps are stored per tile, beside its maps
    ig = g["attributions/integratedgradients"]
    err, delta, steps = (np.asarray(ig[k][:]) for k in ("completeness_error", "completeness_delta", "n_steps"))
    assert err.shape == delta.shape == steps.shape == (6,) and np.isfinite(err).all()
    assert (steps >= cfg.ig_steps).all() and "completeness_error" not in g["attributions/saliency"]
    assert ((err <= cfg.ig_tolerance) | (delta <= IG_ATOL) | (steps == cfg.ig_max_steps)).all()
    # honest timings: the unit's seconds are its wall time (model load, fused pass and both
    # attributors), the parts are in timings, and `status` shows them
    rec = json.loads((run_dir / "manifest.json").read_text())["stages"]["extract"]["slides"]["generic"]
    t = rec["timings"]
    assert {"read", "normalise", "fused", "write", "load_model", "attr:saliency", "attr:integratedgradients"} <= set(t)
    assert rec["seconds"] == pytest.approx(t["wall"], abs=2e-3)
    assert t["wall"] >= t["fused_pass_wall"] + t["attr:saliency"] + t["attr:integratedgradients"] - 1e-3
    assert t["fused_pass_wall"] >= t["fused"] + t["read"] - 1e-3 and t["attr:integratedgradients"] > 0
    assert rec["tiles_per_s"] == pytest.approx(rec["n_tiles"] / rec["seconds"], rel=0.02)
    res = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "status", str(run_dir)], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0 and "attr:integratedgradients" in " ".join(res.stdout.split())


@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted(run_dir, tmp_path):
    """A run killed with SIGKILL mid-slide resumes and ends with the arrays of an uninterrupted run."""
    clean = tmp_path / "clean"
    shutil.copytree(run_dir, clean)
    cfg = _cfg(arch="tests.tiny_models:slow_cnn", chunk_tiles=32, batch_size=16)
    code = (
        "import sys; from wsi_explain import RunFolder; from wsi_explain.core.config import ExtractConfig; "
        "from wsi_explain.stages.extract import run_extract_stage; "
        f"cfg = ExtractConfig.model_validate_json({cfg.model_dump_json()!r}); "
        "run = RunFolder(sys.argv[1]); run_extract_stage(run, cfg, slide_ids=['generic'])"
    )
    store = run_dir / "slides/generic/features.zarr"
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            done = int(np.asarray(zarr.open_group(str(store), mode="r")["done"][:]).sum())
        except Exception:
            continue
        if done >= 64:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = len(read_tile_table(run_dir / "slides/generic/tiles.parquet")[0])
    assert 0 < done < n, f"kill landed at {done} of {n} tiles"
    with RunFolder(run_dir) as run:  # the killed process's lock died with it
        [r] = run_extract_stage(run, cfg, slide_ids=["generic"])
    assert r.status == "done" and r.tiles_per_s > 0
    with RunFolder(clean) as run:
        run_extract_stage(run, cfg, slide_ids=["generic"])
    a, b = _arrays(store), _arrays(clean / "slides/generic/features.zarr")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cli_extract(run_dir, tmp_path):
    torch.save(tiny_cnn().state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.yaml").write_text("class_names: [benign, tumour]\n")
    cmd = [
        sys.executable,
        "-m",
        "wsi_explain.cli",
        "extract",
        str(run_dir),
        "--model",
        TINY,
        "--weights",
        str(tmp_path / "w.pt"),
        "--methods",
        "gradcam,layercam",
        "--workers",
        "0",
        "--target",
        "tumour",
        "--decoder",
        "openslide",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tiles/s" in res.stdout and "2 slide(s) extracted, 0 failed" in res.stdout
    g = zarr.open_group(str(run_dir / "slides/generic/features.zarr"), mode="r")
    assert g.attrs["class_names"] == ["benign", "tumour"] and (np.asarray(g["targets"][:]) == 1).all()
    bad = subprocess.run(cmd[:-4] + ["--target", "nonsense"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "nonsense" in bad.stderr
    bad = subprocess.run(cmd[:-1] + ["nvjpeg"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "decoder" in bad.stderr and "openslide" in bad.stderr
    unsafe = tmp_path / "unsafe.pt"
    from tests.tiny_models import Unsafe

    torch.save({"state_dict": tiny_cnn().state_dict(), "x": Unsafe()}, unsafe)
    res = subprocess.run(
        cmd[:7] + ["--weights", str(unsafe), "--num-classes", "2"], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 2 and "--trust-checkpoint" in res.stderr


def test_readers_give_identical_results(tiled, tmp_path):
    """Threads, worker processes and the calling thread read the same tiles into the same arrays,
    whether the TIFF's tiles are decoded directly (the default) or by OpenSlide; the decoder is an
    execution setting, outside the results' hash."""
    out = {}
    runs = (("threads", 2, "auto"), ("processes", 2, "auto"), ("threads", 0, "auto"), ("threads", 2, "openslide"))
    for reader, workers, decoder in runs:
        d = copy_run(tiled, tmp_path / f"{reader}{workers}{decoder}")
        with RunFolder(d) as run:
            cfg = _cfg(reader=reader, workers=workers, decoder=decoder)
            run_extract_stage(run, cfg, slide_ids=["corrupt_middle"])
        out[(reader, workers, decoder)] = _arrays(d / "slides/corrupt_middle/features.zarr")
    assert _cfg(decoder="openslide").result_params() == _cfg().result_params()
    ref = out[("threads", 0, "auto")]
    assert (ref["status"] == STATUS_READ_ERROR).any()  # decode failures included
    for key, arrs in out.items():
        for k in ref:
            np.testing.assert_array_equal(arrs[k], ref[k], err_msg=f"{key} {k}")


def test_incomplete_integrated_gradients_are_noted_end_to_end(run_dir):
    """Two steps without refinement and no absolute floor: the slide's record names the
    incomplete IG maps first among its problems, and `status` prints the note."""
    cfg = _cfg(methods=("gradcam", "integratedgradients"), attr_sample=4, attr_px=8, ig_steps=2, ig_max_steps=2)
    cfg = cfg.model_copy(update={"ig_tolerance": 1e-6})
    with RunFolder(run_dir) as run:
        (res,) = run_extract_stage(run, cfg, slide_ids=["corrupt_middle"])
    assert res.status == "done" and res.problems[0].startswith("integratedgradients: ")
    assert any("decode" in p for p in res.problems[1:])  # the tiles' own problems follow
    shown = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "status", str(run_dir)], capture_output=True, text=True, cwd=REPO
    )
    assert "corrupt_middle: " in shown.stdout and "integratedgradients: " in " ".join(shown.stdout.split())


def test_incomplete_integrated_gradients_are_noted_for_the_slide(tmp_path):
    """The slide's record names the IG maps that stay above the completeness tolerance (how many,
    the steps they reached, the largest error); a store without IG, or with every map within the
    tolerance, gives no note."""
    from wsi_explain.io.features import add_attributions
    from wsi_explain.stages.extract_attributions import attribution_notes

    store = tmp_path / "f.zarr"
    zarr.open_group(str(store), mode="w")
    cfg = _cfg(methods=("gradcam", "integratedgradients"))
    assert attribution_notes(store, cfg) == []
    diag = {
        "completeness_error": np.float32([0.01, 0.3, 0.2, 0.9, np.nan]),
        "completeness_delta": np.float32([1e-2, 1e-1, 1e-1, 1e-5, np.nan]),  # the 4th is within the floor
        "n_steps": np.int32([50, 200, 200, 50, 200]),
    }
    add_attributions(store, "integratedgradients", np.arange(5), np.zeros((5, 4, 4), np.float32), diag)
    (note,) = attribution_notes(store, cfg)
    assert note.startswith("integratedgradients: 3 of 5 maps above 5% completeness error at 200 steps")
    assert "largest 30%" in note and "--ig-max-steps" in note  # NaN counted, not the largest
    assert attribution_notes(store, _cfg(methods=("integratedgradients",), ig_tolerance=0.5)) == [
        "integratedgradients: 1 of 5 maps above 50% completeness error at 200 steps (not finite); raise --ig-max-steps"
    ]
