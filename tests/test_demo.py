"""The README's main command: ``wsi-explain demo`` builds the cohort and runs the whole audit."""

from __future__ import annotations

import json
import re
import subprocess

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_runs_finds_the_ink_shortcut_and_rerun_is_a_noop(demo_run):
    run, res, cmd = demo_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "7 slide(s) tiled, 0 failed" in res.stdout and "run folder:" in res.stdout and "report:" in res.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("tile", "extract"):
        recs = manifest["stages"][stage]["slides"]
        assert len(recs) == 7 and all(r["status"] == "done" for r in recs.values()), stage
    for stage in ("cluster", "score", "report"):
        assert manifest["stages"][stage]["slides"]["cohort"]["status"] == "done", stage
    assert (run / "report/index.html").exists() and "randomisation sanity check: gradcam" in res.stdout
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    clusters = pd.read_parquet(run / "cohort/clusters.parquet")
    metrics = pd.read_parquet(run / "cohort/cluster_metrics.parquet")
    assert {"deletion_auc_blur", "road_combined", "sensitivity", "sanity_spearman", "gini"} <= set(metrics.metric)
    from wsi_explain.demo.data import find_demo_source

    assert find_demo_source().parent.name == "data" and "demo source:" in res.stdout  # the shipped real H&E
    # the ink detector finds the drawn strokes (their outlines are saved beside the slides) ...
    scores = re.findall(r"ink detector on (\S+): recall ([0-9.]+), precision ([0-9.]+)", res.stdout)
    assert len(scores) == 3 and all(float(r) >= 0.9 and float(p) >= 0.9 for _, r, p in scores), scores
    # ink is drawn on positive training slides only, so the fitted head learns it as a shortcut ...
    ink = tiles["ink_frac"] >= 0.1
    train = tiles["split"] != "test"
    assert (ink & train).sum() >= 10 and tiles.loc[ink & train, "prob_pos"].mean() > 0.8
    # ... the cluster summaries flag it, in words, and its attribution lies on the ink ...
    flagged = clusters[clusters["flags"].apply(lambda f: "artefact_positive" in list(f))]
    assert len(flagged) >= 1 and "tiles carry pen ink" in " ".join(flagged.iloc[0]["flag_reasons"])
    assert flagged.iloc[0]["ink_tile_share"] >= 0.5
    assert tiles.loc[ink, "cam_on_ink"].mean() > 0.1 > tiles.loc[~ink, "cam_on_ink"].mean()
    # ... and the held-out negative slide with ink scores high: removing the ink clusters lowers its
    # slide score, the cluster-removal experiment says so
    rem = pd.read_parquet(run / "cohort/cluster_removal.parquet")
    held = rem[rem.slide_id.str.contains("heldout") & rem.cluster.isin(flagged["cluster"])]
    assert len(held) >= 1 and held["d_topk"].min() < -0.1
    stamp = (run / "cohort/tiles.parquet").stat().st_mtime_ns
    res2 = subprocess.run(cmd, capture_output=True, text=True)
    assert res2.returncode == 0 and res2.stdout.count("skipped") >= 7
    assert (run / "cohort/tiles.parquet").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_run_with_a_mil_head_on_the_demo(demo_run, tmp_path):
    """`wsi-explain run --mil-head` on the demo cohort, with a tiny ABMIL fitted here on the demo's
    own stored embeddings and slide labels: relevance in every slide's store, the MIL tables, the
    report's section on what the slide decisions rest on, the explorer's colour menu by attention
    and relevance; the stages already done are not redone."""
    import sys

    import numpy as np
    import torch
    import zarr

    from tests.conftest import copy_run
    from wsi_explain.explain.mil import fit_mil_head

    run_dir, proc, _ = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = copy_run(run_dir, tmp_path / "run")
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    sids = sorted(tiles.slide_id.unique())
    bags = [
        np.asarray(zarr.open_group(str(run / "slides" / s / "features.zarr"), mode="r")["embeddings"][:]) for s in sids
    ]
    labels = [int(tiles.loc[tiles.slide_id == s, "label"].iloc[0]) for s in sids]
    head = fit_mil_head(bags, labels, epochs=20, seed=0)
    torch.save(head.head.state_dict(), tmp_path / "abmil.pt")
    extract_end = json.loads((run / "manifest.json").read_text())["stages"]["extract"]["slides"][sids[0]]["end"]
    cmd = [sys.executable, "-m", "wsi_explain.cli", "run", "--slides", str(run / "demo_slides"), "--out", str(run)]
    cmd += ["--stages", "report", "--mil-head", "abmil", "--mil-weights", str(tmp_path / "abmil.pt")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = " ".join(res.stdout.split())
    assert f"MIL head abmil on {len(sids)} slides" in out and "cohort AUC of the head: 1.000" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["extract"]["slides"][sids[0]]["end"] == extract_end  # not redone
    assert manifest["stages"]["mil"]["slides"]["cohort"]["status"] == "done"
    for s in sids:
        g = zarr.open_group(str(run / "slides" / s / "features.zarr"), mode="r")["mil"]
        assert np.isfinite(np.asarray(g["integrated_gradients"][:])).any()
    for f in ("mil_slides", "mil_clusters", "mil_counterfactuals", "mil_tiles"):
        assert len(pd.read_parquet(run / f"cohort/{f}.parquet"))
    index = (run / "report/index.html").read_text()
    assert "Slide decisions: what the MIL head rests on" in index and "rest most on" in index
    assert "max |Δ slide probability| when removed" in index
    assert "MIL attention (1 = uniform)" in index and "MIL relevance (Integrated Gradients)" in index
