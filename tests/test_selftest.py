"""The audit's self-test: planted shortcuts, the planted cohort's design, and ``wsi-explain selftest``
on the demo run (loose bounds on what the audit must find)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import copy_run
from tiling.plants import PLANT_KINDS, plant, plant_blur, plant_stain
from tiling.qc import tile_measures
from tiling.stain import standard_stains


@pytest.fixture(scope="module")
def real_tiles(real_fields):
    """224 px tissue tiles cut from the real H&E fields (data/; CMU-1's corners are glass)."""
    out = []
    for img, mpp in real_fields.values():
        h, w = img.shape[:2]
        for y, x in ((max(h // 2 - 224, 0), max(w // 2 - 224, 0)), (min(h // 2, h - 224), min(w // 2, w - 224))):
            out.append((np.ascontiguousarray(img[y : y + 224, x : x + 224, :3]), mpp))
    return out


def test_plants_change_what_they_should_and_leave_the_input_alone(real_tiles):
    st = standard_stains()
    rng = np.random.default_rng(0)
    for tile, mpp in real_tiles:
        before = tile.copy()
        base = tile_measures(tile, st)
        # out of focus by the QC's measure from 2 px on (past ~4 px the uint8 rounding noise, not the
        # tissue, sets the measure, so it need not fall further; it stays far below the threshold)
        blurred = [tile_measures(plant_blur(tile, sigma_um=s * mpp, mpp=mpp), st)["sharpness"] for s in (1, 2, 4, 8)]
        assert base["sharpness"] > blurred[0] > blurred[1] > blurred[2] and max(blurred[1:]) < 0.06, blurred
        stained = tile_measures(plant_stain(tile), st)
        assert stained["od_h"] > 1.2 * base["od_h"] and stained["od_e"] <= base["od_e"]
        inked = plant("ink", tile, rng, mpp=1.0)
        assert (inked != tile).any(-1).mean() > 0.1  # a stroke crosses the tile
        assert np.array_equal(tile, before)
    with pytest.raises(ValueError, match="unknown plant kind"):
        plant("fold", real_tiles[0][0], rng, mpp=1.0)


def test_design_balances_labels_and_kinds_and_is_seeded():
    from wsi_explain.selftest.cohort import design_cohort

    d = design_cohort(500, n_slides=12, tiles_per_slide=16, seed=3)
    assert len(d) == 12 * 16 and d["source"].is_unique  # enough sources: no tile used twice
    per = d.groupby("slide_id").agg(label=("label", "first"), kind=("kind", "first"), share=("planted", "mean"))
    assert per.groupby("kind")["label"].agg(["sum", "size"]).eq([2, 4]).all().all()
    part = per[per["kind"] != "stain"]  # ink and blur: a share of each slide's tiles
    assert set(part["share"]) == {0.5, 0.125} and (part["share"][part["label"] == 1] == 0.5).all()
    whole = per[per["kind"] == "stain"]  # a stain shift covers whole slides: the positives and one negative
    assert (whole["share"][whole["label"] == 1] == 1).all()
    assert sorted(whole["share"][whole["label"] == 0]) == [0.0, 1.0]
    assert d.equals(design_cohort(500, n_slides=12, tiles_per_slide=16, seed=3))
    assert not d.equals(design_cohort(500, n_slides=12, tiles_per_slide=16, seed=4))
    few = design_cohort(20, n_slides=6, tiles_per_slide=16)  # too few clean tiles: drawn with replacement
    assert few["source"].between(0, 19).all()
    with pytest.raises(ValueError, match="two slides per kind"):
        design_cohort(500, n_slides=4, kinds=PLANT_KINDS)


def test_training_tiles_are_planted_copies_with_their_labels(real_tiles):
    """The shortcut model's training tiles: planted where the design says (not in the control), the
    slide labels in the design's order, the source tiles untouched."""
    from wsi_explain.selftest.cohort import design_cohort, training_tiles

    images = np.stack([t for t, _ in real_tiles])
    before = images.copy()
    d = design_cohort(len(images), n_slides=6, tiles_per_slide=4, seed=1)
    imgs, labels = training_tiles(images, d, mpp=0.5, seed=2)
    ctrl, _ = training_tiles(images, d, mpp=0.5, planted=False)
    assert np.array_equal(images, before) and labels.tolist() == d["label"].tolist()
    changed = (imgs != images[d["source"].to_numpy()]).any(axis=(1, 2, 3))
    assert np.array_equal(changed, d["planted"].to_numpy())
    assert np.array_equal(ctrl, images[d["source"].to_numpy()])


def test_cells_map_back_from_tile_positions():
    from wsi_explain.selftest.cohort import cell_of

    px, n = 32, 10  # 4 columns, 3 rows, one cell of glass around
    x = np.array([32, 64, 128, 32, 0, 160, 64])
    y = np.array([32, 32, 32, 64, 32, 32, 96])
    assert cell_of(x, y, tile_px=px, tiles_per_slide=n).tolist() == [0, 1, 3, 4, -1, -1, 9]


@pytest.mark.slow
def test_selftest_on_the_demo_finds_the_plants_and_the_control_has_no_flag(demo_run, tmp_path):
    src, res, _ = demo_run
    assert res.returncode == 0, res.stderr[-2000:]
    run = copy_run(src, tmp_path / "run")
    cmd = [sys.executable, "-m", "wsi_explain.cli", "selftest", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "self-test: planted shortcuts" in out.stdout and "control cohort (nothing planted)" in out.stdout
    fig = json.loads((run / "cohort/selftest.json").read_text())
    kinds = fig["planted"]["kinds"]
    assert set(kinds) == set(PLANT_KINDS)
    # the shortcut head leans on every plant ...
    assert all(k["shortcut_auroc"] > 0.7 for k in kinds.values()), {k: v["shortcut_auroc"] for k, v in kinds.items()}
    # ... every plant lands in flagged clusters or artefact slices (the stain through its slides),
    # and what is flagged is planted ...
    for kind in PLANT_KINDS:
        assert kinds[kind]["recall"] >= 0.5 and kinds[kind]["precision"] >= 0.8, kinds[kind]
        assert kinds[kind]["recall"] >= kinds[kind]["recall_clusters"]
    assert fig["planted"]["precision"] >= 0.8
    # ... the confounder scan names sharpness first on the blurred slides, and a staining measure
    # among its first three on the stained ones (whole slides: few slides vary within a label, so
    # its interval is wide) ...
    assert kinds["blur"]["scan_found"] and kinds["blur"]["scan_rho"] < 0
    assert kinds["stain"]["scan_rank"] <= 3
    # ... and the same tiles with nothing planted raise no artefact flag
    assert fig["control"]["flagged_clusters"] == [] and fig["control"]["flagged_slices"] == []
    assert "no artefact flag" in out.stdout
    # `status` says what the scan and the self-test found, beside the stages
    st = subprocess.run([sys.executable, "-m", "wsi_explain.cli", "status", str(run)], capture_output=True, text=True)
    assert st.returncode == 0 and "stage: selftest" in st.stdout and "self-test: planted shortcuts" in st.stdout
    assert "confounder scan (within label strata" in st.stdout
    # a rerun reuses the cohorts: their stages skip and the figures are the same
    planted_tiles = run / "selftest/planted/run/cohort/tiles.parquet"
    stamp = planted_tiles.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and planted_tiles.stat().st_mtime_ns == stamp
    fig2 = json.loads((run / "cohort/selftest.json").read_text())
    assert json.dumps(fig2["planted"]["kinds"]) == json.dumps(kinds)


def test_selftest_bad_input_is_a_clear_error(tmp_path, extracted):
    base = [sys.executable, "-m", "wsi_explain.cli", "selftest"]

    def err(*args) -> str:
        res = subprocess.run(base + [str(a) for a in args], capture_output=True, text=True)
        assert res.returncode == 2, res.stdout[-2000:]
        return " ".join(res.stderr.split())  # rich folds long lines

    assert "not a run folder" in err(tmp_path / "nowhere") and not (tmp_path / "nowhere").exists()
    assert "at least two per plant kind" in err(extracted, "--n-slides", "4")
    assert "kinds" in err(extracted, "--kinds", "fold")


def test_pipeline_selftest_section_reaches_the_report(audit_run, tmp_path):
    """``run`` with a ``selftest:`` section runs it after scoring and the report shows it (small
    cohort, no control, the tiny CNN: the figures are not checked here, the wiring is)."""
    import yaml

    run = copy_run(audit_run, tmp_path / "run")
    cfg = {
        "slides": [str(audit_run.parent / "cohort.csv")],
        "out": str(run),
        "tile": {"tile_px": 32, "mpp_target": 1.0, "verify": "none"},
        "extract": json.loads((run / "manifest.json").read_text())["config"]["extract"],
        "cluster": {"method": "kmeans", "k": 3, "pca": 16, "positive_labels": ["Tumour"]},
        "selftest": {"n_slides": 6, "tiles_per_slide": 9, "control": False, "n_boot": 50},
        "stages": ["tile", "extract", "cluster", "report"],
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "wsi_explain.cli", "run", str(tmp_path / "run.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "selftest: finished" in res.stdout and "self-test: planted shortcuts" in res.stdout
    fig = json.loads((run / "cohort/selftest.json").read_text())
    assert "control" not in fig and fig["planted"]["n_planted"] > 0
    t = pd.read_parquet(run / "selftest/planted/run/cohort/tiles.parquet")
    assert t["slide_id"].nunique() == 6
    html = (run / "report/index.html").read_text()
    assert "Self-test: planted shortcuts" in html and "removal rank" in html
