"""The README's main command: ``wsi-explain demo`` builds the demo cohort and runs the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wsi_explain import read_tile_table


@pytest.mark.slow
def test_demo_runs_and_rerun_is_a_noop(tmp_path):
    cmd = [sys.executable, "-m", "wsi_explain.cli", "demo", "--out", str(tmp_path / "run"), "--n-slides", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 slide(s) tiled, 0 failed" in res.stdout
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    recs = manifest["stages"]["tile"]["slides"]
    assert len(recs) == 4 and all(r["status"] == "done" for r in recs.values())
    tiles, meta = read_tile_table(tmp_path / "run/slides" / next(iter(recs)) / "tiles.parquet")
    assert len(tiles) > 20 and meta["meta"]["label"] in ("0", "1")
    res2 = subprocess.run(cmd, capture_output=True, text=True)
    assert res2.returncode == 0 and res2.stdout.count("skipped") == 4
