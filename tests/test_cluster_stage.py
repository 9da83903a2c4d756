"""The cohort clustering stage end to end on extracted generated slides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

import clustering as C
from tests.conftest import copy_run
from wsi_explain import RunFolder
from wsi_explain.core.config import ClusterConfig
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.stages.cluster import run_cluster_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clustered(extracted, tmp_path_factory):
    run_dir = copy_run(extracted, tmp_path_factory.mktemp("clustered") / "run")
    cfg = ClusterConfig(concepts=3, min_cluster_size=10, pca=16)
    with RunFolder(run_dir) as run:
        out = run_cluster_stage(run, cfg)
    return run_dir, cfg, out


def test_outputs(clustered):
    run_dir, cfg, out = clustered
    assert out.status == "done" and out.n_tiles > 100 and out.n_clusters >= 1
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    for col in (
        "slide_id",
        "tile_id",
        "pred",
        "prob_0",
        "prob_1",
        "confidence",
        "cluster",
        "membership",
        "outlier_score",
        "umap_x",
        "umap_y",
        "tissue_frac",
        "ink_frac",
        "cam_off_tissue",
        "concept_0",
    ):
        assert col in tiles, col
    assert set(tiles["slide_id"]) == {"generic", "corrupt_middle"}
    # decode failures are not clustered
    g = zarr.open_group(str(run_dir / "slides/corrupt_middle/features.zarr"), mode="r")
    ok = np.asarray(g["status"][:]) == 1
    assert (tiles["slide_id"] == "corrupt_middle").sum() == ok.sum() < len(ok)
    assert np.isfinite(tiles[["umap_x", "umap_y"]].to_numpy()).all()
    assert tiles["cam_off_tissue"].between(0, 1).all()
    clusters = pd.read_parquet(run_dir / "cohort/clusters.parquet")
    assert clusters["size"].sum() == len(tiles)
    slices = pd.read_parquet(run_dir / "cohort/artefact_slices.parquet")  # artefacts across clusters
    masks = C.artefact_masks(tiles)
    assert (
        set(slices["kind"]) == set(masks)
        and (slices.set_index("kind")["n_tiles"] == pd.Series(masks).map(np.sum)).all()
    )
    assert {"entropy", "ensemble_std"} & set(tiles.columns) == {"entropy"}  # no ensemble in this run
    nn = C.NeighbourIndex(run_dir / "cohort/neighbours.faiss")  # "find similar": one row per tile
    assert len(nn) == len(tiles) and nn.similar([0], 3)[0].shape == (1, 3)
    assert set(clusters["cluster"]) == set(tiles["cluster"])
    reps = json.loads(clusters.iloc[0]["representatives"])
    assert reps["medoid"] and ":" in reps["medoid"][0]
    meta = json.loads(pq.read_schema(run_dir / "cohort/tiles.parquet").metadata[b"wsi_explain"])
    assert meta["cam_method"] == "gradcam"
    c = zarr.open_group(str(run_dir / "cohort/concepts.zarr"), mode="r")
    assert c["components"].shape == (3, 64) and c["weights"].shape == (len(tiles), 3)
    assert c["maps"].shape[1:] == (3, 4, 4) and len(c.attrs["auc"]) == 3
    rec = json.loads((run_dir / "manifest.json").read_text())["stages"]["cluster"]["slides"]["cohort"]
    assert rec["status"] == "done" and {"read", "knn", "umap_2d", "umap_5d", "cluster", "concepts"} <= set(
        rec["timings"]
    )


def test_rerun_is_a_noop_and_seeded_runs_agree(clustered, tmp_path):
    run_dir, cfg, _ = clustered
    stamp = (run_dir / "cohort/tiles.parquet").stat().st_mtime_ns
    with RunFolder(run_dir) as run:
        assert run_cluster_stage(run, cfg).status == "skipped"
    assert (run_dir / "cohort/tiles.parquet").stat().st_mtime_ns == stamp
    other = copy_run(run_dir, tmp_path / "again")
    for p in (other / "cohort").iterdir():
        p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    with RunFolder(other) as run:
        run.stage("cluster")["slides"].clear()
        assert run_cluster_stage(run, cfg).status == "done"
    a = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    b = pd.read_parquet(other / "cohort/tiles.parquet")
    np.testing.assert_array_equal(a["cluster"], b["cluster"])
    np.testing.assert_allclose(a[["umap_x", "umap_y"]], b[["umap_x", "umap_y"]])


def test_kmeans_option(extracted, tmp_path):
    run_dir = copy_run(extracted, tmp_path / "run")
    with RunFolder(run_dir) as run:
        out = run_cluster_stage(run, ClusterConfig(method="kmeans", k=4, pca=0))
    assert out.n_clusters == 4 and out.n_noise == 0
    assert not (run_dir / "cohort/concepts.zarr").exists()


def test_needs_extraction_and_activations(tiled, tmp_path):
    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.stages.extract import run_extract_stage

    with RunFolder(copy_run(tiled, tmp_path / "t")) as run:
        with pytest.raises(WsiExplainError, match="run `wsi-explain extract` first"):
            run_cluster_stage(run, ClusterConfig())
        run_extract_stage(
            run, ExtractConfig(arch="tests.tiny_models:tiny_cnn", num_classes=2, methods=("gradcam",), workers=0)
        )
        with pytest.raises(WsiExplainError, match="--activations"):
            run_cluster_stage(run, ClusterConfig(concepts=2, pca=0))


def test_cli_cluster(extracted, tmp_path):
    run_dir = copy_run(extracted, tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "wsi_explain.cli",
        "cluster",
        str(run_dir),
        "--method",
        "kmeans",
        "-k",
        "3",
        "--pca",
        "8",
        "--no-l2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 clusters" in res.stdout and "timings" in res.stdout
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert "skipped" in res.stdout
    cfg = json.loads((run_dir / "manifest.json").read_text())["config"]["cluster"]
    assert cfg["l2"] is False and cfg["pca"] == 8 and cfg["k"] == 3
    bad = subprocess.run(cmd[:5] + ["--method", "dbscan"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "method" in bad.stderr


def test_cam_share_on_ink_cells():
    """cam_on_ink is the share of a CAM's mass on pen-ink cells of the coded tissue mask."""
    import clustering
    from wsi_explain.io.tile_table import tissue_cells

    cam = np.zeros((1, 2, 2), np.float32)
    cam[0, 0, 0], cam[0, 1, 1] = 3.0, 1.0
    ink = np.array([[[True, False], [False, False]]])
    assert clustering.off_tissue_fraction(cam, ~ink)[0] == pytest.approx(0.75)
    assert tissue_cells.__doc__ and "pen ink" in tissue_cells.__doc__
