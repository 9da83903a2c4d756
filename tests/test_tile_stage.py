"""The tiling stage and ``wsi-explain tile``: outputs, bad input per slide, reruns are no-ops."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from wsi_explain import RunFolder, TileConfig, discover_slides, read_tile_table, run_tile_stage

BAD = {
    "missing": "no such file",
    "notaslide": "OpenSlide cannot open it",
    "empty": "OpenSlide cannot open it",
    "truncated": "OpenSlide cannot open it",
    "corrupt_middle": "failed to decode region",
    "blank": "no tissue found",
    "nompp": "pass --mpp",
}


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_outputs_and_metadata(slides, tmp_path):
    cfg = TileConfig(tile_px=224, mpp_target=0.5)
    with RunFolder(tmp_path / "run") as run:
        res = run_tile_stage(run, discover_slides([slides["tiff"], slides["svs"]]), cfg)
    assert [r.status for r in res] == ["done", "done"]
    tiles, meta = read_tile_table(tmp_path / "run/slides/generic/tiles.parquet")
    assert meta["slide_id"] == "generic" and meta["level0_mpp"] == pytest.approx(0.25)
    assert meta["tiling_config"]["tile_px"] == 224 and len(meta["slide_fingerprint"]) == 32
    assert len(tiles) == res[0].n_tiles and tiles["tile_id"].tolist() == list(range(len(tiles)))
    thumb = np.asarray(Image.open(tmp_path / "run/slides/generic/thumbnail.png"))
    assert thumb.ndim == 3 and (thumb == (0, 160, 0)).all(-1).any()  # grid drawn
    # the same pixels at twice the mpp cover four times the tissue area
    assert abs(res[1].n_tiles - 4 * res[0].n_tiles) <= 0.2 * 4 * res[0].n_tiles


def test_bad_input_is_recorded_and_the_batch_finishes(slides, tmp_path):
    paths = [slides["tiff"], tmp_path / "missing.svs"] + [slides[k] for k in BAD if k != "missing"] + [slides["svs"]]
    cfg = TileConfig(verify="all")
    with RunFolder(tmp_path / "run") as run:
        res = run_tile_stage(run, discover_slides(paths), cfg)
    by_id = {r.slide_id: r for r in res}
    assert by_id["generic"].status == "done" and by_id["aperio"].status == "done"
    names = {
        "missing": "missing",
        "notaslide": "notaslide",
        "empty": "empty",
        "truncated": "truncated",
        "corrupt_middle": "corrupt_middle",
        "blank": "blank",
        "nompp": "nompp",
    }
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    for key, sid in names.items():
        r = by_id[sid]
        assert r.status == "failed", sid
        assert BAD[key] in r.error and sid in r.error, r.error  # names the slide and the problem
        rec = manifest["stages"]["tile"]["slides"][sid]
        assert rec["status"] == "failed" and rec["error"] == r.error
        assert not (tmp_path / "run/slides" / sid / "tiles.parquet").exists()


def test_sample_verification_misses_nothing_it_reads(slides, tmp_path):
    # without verification the mid-slide corruption goes unnoticed at tiling time (it is reported
    # per tile by extraction); with verify=all it fails here, naming the slide
    with RunFolder(tmp_path / "a") as run:
        [r] = run_tile_stage(run, discover_slides([slides["corrupt_middle"]]), TileConfig(verify="none"))
    assert r.status == "done"
    with RunFolder(tmp_path / "b") as run:
        [r] = run_tile_stage(run, discover_slides([slides["corrupt_middle"]]), TileConfig(verify="all"))
    assert r.status == "failed" and "corrupt_middle" in r.error


def test_rerun_is_a_noop_and_params_change_reruns(slides, tmp_path):
    srcs = discover_slides([slides["tiff"]])
    cfg = TileConfig()
    with RunFolder(tmp_path) as run:
        run_tile_stage(run, srcs, cfg)
    out = tmp_path / "slides/generic/tiles.parquet"
    mtime, content = out.stat().st_mtime_ns, out.read_bytes()
    with RunFolder(tmp_path) as run:
        [r] = run_tile_stage(run, srcs, cfg)
    assert r.status == "skipped" and out.stat().st_mtime_ns == mtime and out.read_bytes() == content
    with RunFolder(tmp_path) as run:
        [r] = run_tile_stage(run, srcs, TileConfig(tile_px=256))
    assert r.status == "done"
    tiles, meta = read_tile_table(out)
    assert meta["tiling_config"]["tile_px"] == 256 and (tiles["tile_px"] == 256).all()


def test_explicit_mpp_overrides(slides, tmp_path):
    srcs = discover_slides([slides["nompp"]], mpp=0.25)
    with RunFolder(tmp_path) as run:
        [r] = run_tile_stage(run, srcs, TileConfig())
    assert r.status == "done"
    tiles, meta = read_tile_table(tmp_path / "slides/nompp/tiles.parquet")
    assert meta["level0_mpp"] == 0.25 and (tiles["size0"] == 448).all()


def test_annotations_via_cohort_csv(slides, tmp_path):
    ann = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tumor"}},
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4096, 0], [4096, 1536], [0, 1536], [0, 0]]]},
            }
        ],
    }
    (tmp_path / "a.geojson").write_text(json.dumps(ann))
    (tmp_path / "cohort.csv").write_text(f"path,annotations,label\n{slides['tiff']},a.geojson,1\n")
    with RunFolder(tmp_path / "run") as run:
        [r] = run_tile_stage(run, discover_slides([tmp_path / "cohort.csv"]), TileConfig())
    assert r.status == "done", r.error
    tiles, meta = read_tile_table(tmp_path / "run/slides/generic/tiles.parquet")
    top = tiles["y"] + tiles["size0"] <= 1536
    assert (tiles.loc[top, "label_tumor"] == 1).all() and (tiles.loc[tiles["y"] >= 1536, "label_tumor"] == 0).all()
    assert meta["meta"] == {"label": "1"}


def test_cli_tile_summary_and_exit_codes(slides, tmp_path):
    res = _cli("tile", slides["tiff"], slides["svs"], "--out", tmp_path / "ok")
    assert res.returncode == 0, res.stderr
    assert "2 slide(s) tiled, 0 failed" in res.stdout
    res = _cli("tile", slides["tiff"], tmp_path / "nope.svs", slides["blank"], "--out", tmp_path / "bad")
    assert res.returncode == 1
    assert "1 slide(s) tiled, 2 failed" in res.stdout and "nope.svs" in res.stdout
    st = _cli("status", tmp_path / "bad")
    assert st.returncode == 0 and "failed" in st.stdout and "no tissue" in st.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["--tile-px", "0"], "tile_px"),
        (["--min-tissue", "2"], "min_tissue"),
        (["--overlap", "300"], "overlap"),
        (["--mpp-target", "-1"], "mpp_target"),
        (["--verify", "sometimes"], "verify"),
    ],
)
def test_cli_rejects_absurd_parameters(slides, tmp_path, args, match):
    res = _cli("tile", slides["tiff"], "--out", tmp_path, *args)
    assert res.returncode == 2 and match in res.stderr and "invalid tiling parameters" in res.stderr


def test_cli_folder_input(slides, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in ("tiff", "svs"):
        (d / slides[k].name).symlink_to(slides[k])
    (d / "readme.txt").write_text("not a slide")
    res = _cli("tile", d, "--out", tmp_path / "run", "--magnification", "10", "--tile-px", "128")
    assert res.returncode == 0, res.stdout + res.stderr
    tiles, _ = read_tile_table(tmp_path / "run/slides/generic/tiles.parquet")
    assert (tiles["mpp"] == 1.0).all()


@pytest.fixture(scope="module")
def inked_slides(tmp_path_factory, real_fields):
    """Pyramidal slides from real H&E: CMU-1 with two marker strokes over its tissue, a slide that
    is nearly all green ink, and CMU-1 as it is."""
    import tiling

    d = tmp_path_factory.mktemp("inked")
    img, mpp = real_fields["cmu1"]
    from shapely.geometry import LineString

    strokes = [
        tiling.Stroke(LineString([(900, 200), (1300, 2800)]).buffer(300), "blue", 0.7, 600.0),
        tiling.Stroke(LineString([(400, 1500), (1900, 1700)]).buffer(250), "black", 0.6, 500.0),
    ]
    out = {
        "marked": tiling.write_svs(d / "marked.svs", tiling.render_strokes(img, strokes), mpp=mpp, magnification=20),
        "clean": tiling.write_svs(d / "clean.svs", img, mpp=mpp, magnification=20),
    }
    ink = np.full((2048, 2048, 3), 244, np.uint8)
    ink[100:1900, 100:1900] = tiling.MARKER_COLOURS["green"]
    out["all_ink"] = tiling.write_pyramidal_tiff(d / "all_ink.tif", ink, mpp=2.0)
    return out, strokes


def test_qc_columns_ink_and_artefact_option(inked_slides, tmp_path):
    """Every documented QC column is in tiles.parquet within its range; inked tissue stays in the
    grid with its ink fraction; the thumbnail shows the ink; --drop-artefacts leaves inked tiles out;
    a slide that is nearly all ink fails with a message that says so."""
    import tiling

    paths, strokes = inked_slides
    with RunFolder(tmp_path / "run") as run:
        res = run_tile_stage(
            run,
            discover_slides([paths["marked"], paths["clean"], paths["all_ink"]]),
            TileConfig(tile_px=112, mpp_target=1.0),
        )
    by_id = {r.slide_id: r for r in res}
    assert by_id["all_ink"].status == "failed" and "pen ink covers" in by_id["all_ink"].error
    marked, meta = read_tile_table(tmp_path / "run/slides/marked/tiles.parquet")
    clean, _ = read_tile_table(tmp_path / "run/slides/clean/tiles.parquet")
    for col, (_unit, rng, _) in tiling.QC_COLUMNS.items():
        v = marked[col].dropna()
        if rng == "real":  # the H:E balance needs 64+ pixels holding both stains (not under a marker)
            assert len(v) >= len(marked) // 3, col
            continue
        assert len(v) == len(marked), col
        assert (v >= 0).all() and (v <= 1).all() if rng == "[0, 1]" else (v >= 0).all(), col
    assert meta["stains"]["source"] == "estimated"
    # the tissue under the strokes is still tiled: (almost) every clean tile is in the marked grid
    assert len(set(zip(clean.x, clean.y)) - set(zip(marked.x, marked.y))) <= 0.05 * len(clean)
    assert (marked["ink_frac"] > 0.5).sum() >= 5 and (clean["ink_frac"] == 0).all()
    assert by_id["marked"].qc["ink_on_tissue"] > 0.05
    thumb = np.asarray(Image.open(tmp_path / "run/slides/marked/thumbnail.png"))
    assert (thumb == (255, 0, 255)).all(-1).sum() > 50  # the ink outline is drawn
    codes = np.asarray(Image.open(tmp_path / "run/slides/marked/tissue.png"))
    assert set(np.unique(codes)) <= {0, 1, 2, 3} and (codes == 2).any()
    with RunFolder(tmp_path / "run2") as run:
        res2 = run_tile_stage(
            run, discover_slides([paths["marked"]]), TileConfig(tile_px=112, mpp_target=1.0, drop_artefacts=True)
        )
    dropped, _ = read_tile_table(tmp_path / "run2/slides/marked/tiles.parquet")
    assert (dropped["ink_frac"] < 0.05).all() and (dropped["sharpness"] >= 0.06).all()
    assert dropped["tile_id"].tolist() == list(range(len(dropped)))
    assert res2[0].qc["n_dropped_artefacts"] == len(marked) - len(dropped) > 0


def test_glass_tiles_get_a_note_not_a_crash(slides, tmp_path):
    """With min_tissue 0 the grid covers glass: those tiles get NaN stain measures and the slide a note."""
    with RunFolder(tmp_path / "run") as run:
        res = run_tile_stage(
            run, discover_slides([slides["svs"]]), TileConfig(tile_px=224, mpp_target=2.0, min_tissue=0.0)
        )
    assert res[0].status == "done" and res[0].qc["n_glass_tiles"] > 0 and "all glass" in res[0].qc["note"]
    tiles, _ = read_tile_table(tmp_path / "run/slides/aperio/tiles.parquet")
    glass = tiles["stained_frac"] == 0
    assert glass.any() and tiles.loc[glass, "od_h"].isna().all() and tiles.loc[~glass, "brightness"].notna().all()
