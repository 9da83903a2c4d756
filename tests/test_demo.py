"""The README's main command: ``wsi-explain demo`` builds the cohort and runs tile -> extract -> cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_runs_finds_the_ink_shortcut_and_rerun_is_a_noop(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsi_explain.cli", "demo", "--out", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "6 slide(s) tiled, 0 failed" in res.stdout and "run folder:" in res.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("tile", "extract"):
        recs = manifest["stages"][stage]["slides"]
        assert len(recs) == 6 and all(r["status"] == "done" for r in recs.values()), stage
    assert manifest["stages"]["cluster"]["slides"]["cohort"]["status"] == "done"
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    clusters = pd.read_parquet(run / "cohort/clusters.parquet")
    from wsi_explain.demo_data import find_demo_source

    if find_demo_source() is None:  # synthetic texture: the pipeline ran; the shortcut is shown on real H&E
        return
    # ink is drawn on positive slides only, so the fitted head learns it as a shortcut ...
    ink = tiles["ink_frac"] >= 0.1
    assert ink.sum() >= 10 and tiles.loc[ink, "prob_pos"].mean() > 0.8
    # ... and the cluster summaries flag it, in words
    flagged = clusters[clusters["flags"].apply(lambda f: "artefact_positive" in list(f))]
    assert len(flagged) >= 1 and "pen ink" in " ".join(flagged.iloc[0]["flag_reasons"])
    stamp = (run / "cohort/tiles.parquet").stat().st_mtime_ns
    res2 = subprocess.run(cmd, capture_output=True, text=True)
    assert res2.returncode == 0 and res2.stdout.count("skipped") >= 6
    assert (run / "cohort/tiles.parquet").stat().st_mtime_ns == stamp
