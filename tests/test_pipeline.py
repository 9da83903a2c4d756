"""The whole audit: Dask LocalCluster vs serial, a killed worker, a batch with bad slides, YAML
configs, a full disk, and SIGKILL at every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from wsi_explain import RunFolder, TileConfig, discover_slides, run_tile_stage
from wsi_explain.core.config import ExtractConfig
from wsi_explain.stages.extract import run_extract_stage

REPO = Path(__file__).resolve().parents[1]
TILE = TileConfig(tile_px=32, mpp_target=1.0, verify="none")


@pytest.fixture(scope="module")
def three_slides(slides, tmp_path_factory):
    from tests.conftest import synthetic_he
    from tiling import write_pyramidal_tiff

    d = tmp_path_factory.mktemp("three")
    img, _ = synthetic_he(2048, 2048, seed=7)
    third = write_pyramidal_tiff(d / "third.tif", img, mpp=0.5)
    return [slides["tiff"], slides["svs"], third]


def _features(run_dir: Path) -> dict:
    out = {}
    for sdir in sorted((run_dir / "slides").iterdir()):
        out[sdir.name + "/tiles"] = pd.read_parquet(sdir / "tiles.parquet")
        g = zarr.open_group(str(sdir / "features.zarr"), mode="r")
        for k in ("embeddings", "logits", "cams/gradcam", "status", "done"):
            out[f"{sdir.name}/{k}"] = np.asarray(g[k][:])
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k])
        else:
            np.testing.assert_allclose(
                a[k].astype(np.float64), b[k].astype(np.float64), rtol=1e-5, atol=1e-5, err_msg=k
            )


def test_local_cluster_equals_serial_and_recovers_a_killed_worker(three_slides, tmp_path):
    from distributed import Client, LocalCluster

    from wsi_explain.core.executor import DaskExecutor

    ecfg = ExtractConfig(
        arch="tests.tiny_models:slow_cnn", num_classes=2, methods=("gradcam",), workers=0, batch_size=16, chunk_tiles=32
    )
    serial = tmp_path / "serial"
    with RunFolder(serial) as run:
        run_tile_stage(run, discover_slides(three_slides), TILE)
        run_extract_stage(run, ecfg)
    dist = tmp_path / "dask"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
        RunFolder(dist) as run,
    ):
        ex = DaskExecutor(client)
        tiled = run_tile_stage(run, discover_slides(three_slides), TILE, executor=ex)
        assert [r.status for r in tiled] == ["done"] * 3
        killed = []

        def part_way() -> bool:
            """Some slide has its first chunk of features written and more to come."""
            for store in (dist / "slides").glob("*/features.zarr"):
                try:
                    done = np.asarray(zarr.open_group(str(store), mode="r")["done"][:])
                except Exception:  # not created yet, or being written
                    continue
                if done.any() and not done.all():
                    return True
            return False

        def kill_a_busy_worker():
            pids = client.run(os.getpid)
            for _ in range(1200):
                busy = [w for w, keys in client.processing().items() if keys]
                if busy and part_way():
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                    return
                time.sleep(0.05)

        t = threading.Thread(target=kill_a_busy_worker)
        t.start()
        res = run_extract_stage(run, ecfg, executor=ex)
        t.join()
    assert killed, "no worker was killed"
    assert [r.status for r in res] == ["done"] * 3
    _assert_same(_features(serial), _features(dist))


def _bad_batch(slides, d: Path) -> list[str]:
    blank = slides["blank"]
    return [
        str(slides["tiff"]),
        str(slides["corrupt_middle"]),
        str(slides["notaslide"]),
        str(blank),
        str(d / "missing.svs"),
    ]


def test_cli_run_from_yaml_with_bad_slides(slides, tmp_path):
    """A batch with a truncated/corrupt slide, an unopenable file, a blank slide and a missing
    one: the others complete; the failures are listed with reasons in status and the report."""
    import yaml

    cfg = {
        "slides": _bad_batch(slides, tmp_path),
        "out": "run",
        "tile": {"tile_px": 32, "mpp_target": 1.0, "verify": "all"},
        "extract": {"arch": "tests.tiny_models:tiny_cnn", "num_classes": 2, "methods": ["gradcam"], "workers": 0},
        "cluster": {"method": "kmeans", "k": 3, "pca": 8},
        "score": {
            "per_cluster": 4,
            "steps": 4,
            "road_percentiles": [50],
            "infidelity_samples": 2,
            "sensitivity_samples": 2,
            "sanity_tiles": 2,
            "baselines": ["constant"],
        },
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "run", str(tmp_path / "audit.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1, res.stdout + res.stderr  # failures are reported in the exit code
    run_dir = tmp_path / "run"
    assert "report:" in res.stdout and (run_dir / "report/index.html").exists()
    out = " ".join(res.stdout.split())
    assert "score: sampled metrics: started" in out and "(100 %)" in out  # progress lines in a log
    assert "confounder scan (within label strata, intervals over slides):" in out
    man = json.loads((run_dir / "manifest.json").read_text())
    tile = man["stages"]["tile"]["slides"]
    assert tile["generic"]["status"] == "done"
    failed = {s: r["error"] for s, r in tile.items() if r["status"] == "failed"}
    # verify=all reads every tile: the slide whose tiles fail to decode part way is refused whole
    assert set(failed) == {"corrupt_middle", "notaslide", "blank", "missing"}, failed
    assert "decode" in failed["corrupt_middle"] and "no such file" in failed["missing"]
    assert set(man["stages"]["extract"]["slides"]) == {"generic"}
    for stage in ("cluster", "score", "report"):
        assert man["stages"][stage]["slides"]["cohort"]["status"] == "done"
    st = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "status", str(run_dir)], cwd=REPO, capture_output=True, text=True
    )
    for sid in failed:
        assert sid in st.stdout
    assert "no tissue" in st.stdout.lower() or "tissue" in failed["blank"].lower()
    index = (run_dir / "report/index.html").read_text()
    assert "Failures" in index and all(s in index for s in failed)
    # a second run skips everything that is done (failed slides are tried again, and fail again)
    again = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "run", str(tmp_path / "audit.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    man2 = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("tile", "extract", "cluster", "score"):
        for sid, rec in man["stages"][stage]["slides"].items():
            if rec["status"] == "done":
                assert man2["stages"][stage]["slides"][sid] == rec, (stage, sid)
            else:
                assert man2["stages"][stage]["slides"][sid]["status"] == "failed"
    assert again.returncode == 1


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_stops_with_a_clear_message_and_resumes(slides, tmp_path, monkeypatch):
    from wsi_explain.core.errors import DiskFullError
    from wsi_explain.stages.pipeline import PipelineConfig, run_pipeline

    mnt = tmp_path / "small"
    real = _mount_tmpfs(mnt, "6m")
    try:
        cfg = PipelineConfig(
            slides=(str(slides["tiff"]), str(slides["svs"])),
            out=str(mnt / "run"),
            tile=TILE,
            extract=ExtractConfig(
                arch="tests.tiny_models:tiny_cnn", num_classes=2, methods=("gradcam",), workers=0, activations=True
            ),
            stages=("tile", "extract"),
        )
        if real:  # fill the file system so that the extraction runs out of space part way
            filler = mnt / "filler"
            filler.write_bytes(b"\0" * (5 * 1024 * 1024 + 300 * 1024))
        else:  # no tmpfs here: a write that fails as a full disk does
            import errno

            import zarr.storage

            orig = zarr.storage.LocalStore.set
            calls = {"n": 0}

            async def full(self, key, value):
                calls["n"] += 1
                if calls["n"] > 40:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return await orig(self, key, value)

            monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
        with pytest.raises(DiskFullError, match="disk full.*free space and rerun"):
            run_pipeline(cfg)
        man = json.loads((mnt / "run/manifest.json").read_text())  # still valid JSON
        for stage, rec in man["stages"].items():
            for sid, r in rec["slides"].items():
                if r["status"] == "done":
                    assert all((mnt / "run" / o).exists() for o in r["outputs"]), (stage, sid)
        assert not list((mnt / "run").rglob("*.tmp*")), "temporary files left behind"
        if real:
            filler.unlink()
        else:
            monkeypatch.undo()
        out = run_pipeline(cfg)
        assert out.stages["extract"].get("failed", 0) == 0
        with RunFolder(mnt / "run", readonly=True) as run:
            assert all(r["status"] == "done" for r in run.stage("extract")["slides"].values())
    finally:
        if real:
            subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_sigkill_in_every_stage_then_rerun_equals_clean_run(slides, tmp_path):
    """`wsi-explain run` killed with SIGKILL once during each stage, rerun after each kill: the
    final cohort tables equal an uninterrupted run's."""
    args = [
        "--slides",
        str(slides["tiff"]),
        "--slides",
        str(slides["svs"]),
        "--model",
        "tests.tiny_models:slow_cnn",
        "--num-classes",
        "2",
        "--tile-px",
        "32",
        "--mpp-target",
        "1.0",
        "--methods",
        "gradcam",
        "--per-cluster",
        "4",
    ]
    yaml_cfg = tmp_path / "cfg.yaml"
    yaml_cfg.write_text(
        "score: {steps: 4, road_percentiles: [50], infidelity_samples: 2, sensitivity_samples: 2, "
        "sanity_tiles: 2, baselines: [constant]}\ncluster: {method: kmeans, k: 3, pca: 8}\n"
        "extract: {batch_size: 16, chunk_tiles: 64, workers: 0}\n"
    )
    cmd = [sys.executable, "-m", "wsi_explain.cli", "run", str(yaml_cfg)] + args
    clean = tmp_path / "clean"
    assert subprocess.run(cmd + ["--out", str(clean)], cwd=REPO, capture_output=True).returncode == 0
    killed = tmp_path / "killed"
    kills = []
    for stage in ("tile", "extract", "cluster", "score", "report"):
        p = subprocess.Popen(
            cmd + ["--out", str(killed)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        seen = ""
        for line in p.stdout:  # kill as soon as the stage has started
            seen += line
            if f"{stage}: started" in line:
                time.sleep(0.3 if stage != "extract" else 1.5)
                p.send_signal(signal.SIGKILL)
                break
        p.wait()
        kills.append((stage, p.returncode))
    assert any(rc == -9 for _, rc in kills), kills
    final = subprocess.run(cmd + ["--out", str(killed)], cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout + final.stderr
    for f in ("cohort/tiles.parquet", "cohort/clusters.parquet", "cohort/cluster_metrics.parquet"):
        a, b = pd.read_parquet(clean / f), pd.read_parquet(killed / f)
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)
    assert (killed / "report/index.html").exists()


def test_pipeline_on_an_existing_dask_scheduler(slides, tmp_path):
    """--scheduler: the per-slide stages go to a cluster started elsewhere (here, a LocalCluster)."""
    from distributed import LocalCluster

    from wsi_explain.stages.pipeline import PipelineConfig, run_pipeline

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cfg = PipelineConfig(
            slides=(str(slides["tiff"]), str(slides["notaslide"])),
            out=str(tmp_path / "run"),
            tile=TILE,
            stages=("tile",),
            scheduler=cluster.scheduler_address,
        )
        res = run_pipeline(cfg)
    assert res.stages["tile"] == {"done": 1, "failed": 1} and set(res.failed_slides) == {"notaslide"}
    man = json.loads((tmp_path / "run/manifest.json").read_text())
    assert man["config"]["pipeline"]["executor"] == "dask"
    assert (tmp_path / "run/slides/generic/tiles.parquet").exists()


def test_run_with_empty_qupath_annotations(slides, tmp_path):
    """A cohort CSV with one GeoJSON per slide: QuPath's empty FeatureCollection for the clean
    slides means "no annotated area" (label fractions 0, the slides stay in the audit); a file that
    is not GeoJSON fails its slide with a clear message and the rest finish."""
    import yaml

    ann = tmp_path / "ann"
    ann.mkdir()
    tumour = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"classification": {"name": "tumour"}},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[1000, 1000], [9000, 1000], [9000, 6000], [1000, 6000], [1000, 1000]]],
                },
            }
        ],
    }
    (ann / "t.geojson").write_text(json.dumps(tumour))
    (ann / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    (ann / "broken.geojson").write_text("<html>not geojson</html>")
    rows = [
        ("pos_a", slides["tiff"], "t.geojson", 1),
        ("pos_b", slides["svs"], "t.geojson", 1),
        ("clean_a", slides["tiff"], "empty.geojson", 0),
        ("clean_b", slides["svs"], "empty.geojson", 0),
        ("broken", slides["tiff"], "broken.geojson", 0),
    ]
    (tmp_path / "cohort.csv").write_text(
        "slide_id,path,annotations,label\n" + "".join(f"{sid},{path},{ann / a},{lab}\n" for sid, path, a, lab in rows)
    )
    cfg = {
        "slides": [str(tmp_path / "cohort.csv")],
        "out": "run",
        "tile": {"tile_px": 32, "mpp_target": 2.0, "verify": "none"},
        "extract": {"arch": "tests.tiny_models:tiny_cnn", "num_classes": 2, "methods": ["gradcam"], "workers": 0},
        "cluster": {"method": "kmeans", "k": 3, "pca": 8, "positive_labels": ["tumour"]},
        "score": {
            "per_cluster": 4,
            "steps": 4,
            "road_percentiles": [50],
            "infidelity_samples": 2,
            "groups": ["faithfulness", "localisation"],
            "sensitivity_samples": 2,
            "sanity_tiles": 2,
            "baselines": ["constant"],
        },
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "run", str(tmp_path / "audit.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1, res.stdout + res.stderr  # the broken annotation file is a failure
    man = json.loads((tmp_path / "run/manifest.json").read_text())
    tile = man["stages"]["tile"]["slides"]
    assert {s for s, r in tile.items() if r["status"] == "done"} == {"pos_a", "pos_b", "clean_a", "clean_b"}
    assert "broken.geojson" in tile["broken"]["error"] and "not valid JSON" in tile["broken"]["error"]
    assert man["stages"]["cluster"]["slides"]["cohort"]["status"] == "done"
    tiles = pd.read_parquet(tmp_path / "run/cohort/tiles.parquet")
    assert set(tiles["slide_id"]) == {"pos_a", "pos_b", "clean_a", "clean_b"}
    clean = tiles[tiles["slide_id"].str.startswith("clean")]
    assert (clean["label_tumour"] == 0).all() and (clean["label_pos"] == 0).all()
    assert tiles.loc[tiles["slide_id"] == "pos_a", "label_tumour"].max() == 1.0
