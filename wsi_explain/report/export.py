"""Exports of a clustered run: one QuPath GeoJSON per slide and the cohort tile table as CSV, both
with the clusters' names and the pathologists' verdicts (``cluster_verdict``, "" when none)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from wsi_explain.core.atomic import atomic_path
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import RunFolder

__all__ = ["export_run", "cluster_names"]

logger = logging.getLogger(__name__)


def cluster_names(run: RunFolder) -> dict[int, str]:
    """Names pathologists gave to clusters (``cohort/cluster_names.json``, see
    :mod:`wsi_explain.report.names`)."""
    from wsi_explain.report.names import read_cluster_names

    return {int(k): str(v) for k, v in read_cluster_names(run.path)["names"].items()}


def export_run(run: RunFolder) -> list[Path]:
    """Write ``exports/<slide>.geojson`` for every slide and ``exports/cohort_tiles.csv``.

    Returns the written paths. Needs the clustering stage's ``cohort/tiles.parquet``.
    """
    from viz import tiles_to_geojson, write_geojson

    src = run.path / "cohort" / "tiles.parquet"
    if not src.exists():
        raise WsiExplainError(f"{run.path}: no cohort/tiles.parquet; run `wsi-explain cluster` first")
    from wsi_explain.report.names import read_cluster_names

    tiles = pd.read_parquet(src)
    names = cluster_names(run)
    verdicts = {int(k): v for k, v in read_cluster_names(run.path)["verdicts"].items()}
    tiles["cluster_verdict"] = [verdicts.get(int(c), "") for c in tiles["cluster"]]
    props = ("prob_pos", "outlier_score", "membership", "pred", "cluster_verdict")
    out_dir = run.path / "exports"
    written = []
    for sid, g in tiles.groupby("slide_id", sort=True):
        written.append(write_geojson(tiles_to_geojson(g, names=names, properties=props), out_dir / f"{sid}.geojson"))
    table = tiles.copy()
    table["cluster_name"] = [names.get(int(c)) or ("noise" if c < 0 else f"cluster {c}") for c in table["cluster"]]
    with atomic_path(out_dir / "cohort_tiles.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    written.append(out_dir / "cohort_tiles.csv")
    return written
