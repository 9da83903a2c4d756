"""QuPath GeoJSON export: parses, carries QuPath's fields, and round-trips through tiling's reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tiling
from tests.conftest import copy_run
from viz import tiles_to_geojson
from wsi_explain import RunFolder
from wsi_explain.core.config import ClusterConfig
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.report.export import export_run
from wsi_explain.stages.cluster import run_cluster_stage

REPO = Path(__file__).resolve().parents[1]
NAME = 'benign <glands> & "stroma"'  # a pathologist's name, with characters that need escaping


@pytest.fixture(scope="module")
def exported(extracted, tmp_path_factory):
    run_dir = copy_run(extracted, tmp_path_factory.mktemp("exported") / "run")
    with RunFolder(run_dir) as run:
        run_cluster_stage(run, ClusterConfig(method="kmeans", k=3, pca=8))
        (run_dir / "cohort/cluster_names.json").write_text(json.dumps({"names": {"1": NAME}}))
        paths = export_run(run)
    return run_dir, paths


def test_geojson_round_trips_through_the_annotation_reader(exported):
    run_dir, paths = exported
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    assert sorted(p.name for p in paths) == ["cohort_tiles.csv", "corrupt_middle.geojson", "generic.geojson"]
    for sid, g in tiles.groupby("slide_id"):
        doc = json.loads((run_dir / "exports" / f"{sid}.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(g)
        props = doc["features"][0]["properties"]
        assert props["objectType"] == "detection" and set(props["classification"]) == {"name", "color"}
        assert {"cluster", "tile_id", "prob_pos", "outlier_score"} <= set(props)
        ann = tiling.read_geojson(run_dir / "exports" / f"{sid}.geojson")
        fr = tiling.geojson_label_fractions(g.reset_index(drop=True), ann)
        for c in g["cluster"].unique():
            name = NAME if c == 1 else f"cluster {c}"
            col = tiling.label_column(name)
            mine = (g["cluster"] == c).to_numpy()
            np.testing.assert_allclose(fr[col].to_numpy()[mine], 1.0, atol=1e-6)  # each tile is its own cluster
            np.testing.assert_allclose(fr[col].to_numpy()[~mine], 0.0, atol=1e-6)  # and no other


def test_csv_is_the_cohort_table_with_names(exported):
    run_dir, _ = exported
    csv = pd.read_csv(run_dir / "exports/cohort_tiles.csv")
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    assert len(csv) == len(tiles) and (csv["tile_id"].to_numpy() == tiles["tile_id"].to_numpy()).all()
    assert set(csv.loc[csv["cluster"] == 1, "cluster_name"]) == {NAME}


def test_colours_are_stable_and_distinct():
    df = pd.DataFrame({"x": [0, 10, 20], "y": 0, "size0": 10, "cluster": [0, 1, -1], "tile_id": [0, 1, 2]})
    a = tiles_to_geojson(df)
    b = tiles_to_geojson(df.iloc[::-1])
    col = {f["properties"]["cluster"]: tuple(f["properties"]["classification"]["color"]) for f in a["features"]}
    assert len(set(col.values())) == 3 and col[-1] == (160, 160, 160)
    assert col == {f["properties"]["cluster"]: tuple(f["properties"]["classification"]["color"]) for f in b["features"]}


def test_export_needs_clustering(tiled, tmp_path):
    with RunFolder(copy_run(tiled, tmp_path / "r")) as run:
        with pytest.raises(WsiExplainError, match="wsi-explain cluster"):
            export_run(run)


def test_cli_export(exported, tmp_path):
    run_dir = copy_run(exported[0], tmp_path / "run")
    res = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "export", str(run_dir)], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0, res.stderr
    assert "2 GeoJSON file(s)" in res.stdout
