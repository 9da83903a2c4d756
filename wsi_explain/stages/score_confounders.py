"""The score stage's cohort-level shortcut evidence: the confounder scan and the site-leakage tests.

Writes, in ``RUN/cohort/``:

- ``confounders.parquet``: every nuisance variable against the positive probability within each
  label stratum, cohort and per cluster, bootstrap over slides (:mod:`wsi_explain.metrics.confounders`);
- ``site_leakage.json``: with a site-like column of 2+ values, the cross-validated probe that reads
  the site from the tile embeddings (folds grouped by slide, permutation p-value);
- ``site_composition.parquet``: per cluster, its top site's share against the cohort's and a
  permutation p-value over slides (:mod:`wsi_explain.metrics.leakage`);
- ``error_clusters.parquet``: with labels, the clusters ranked by the errors they hold beyond the
  cohort's error rate, with their removal effect ("where the model fails").
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from wsi_explain.core.atomic import atomic_write_json, atomic_write_parquet
from wsi_explain.core.config import ScoreConfig
from wsi_explain.core.run import RunFolder

__all__ = ["cohort_confounders", "PROBE_TILES_PER_SLIDE"]

logger = logging.getLogger(__name__)

#: tiles per slide whose embeddings the site probe reads (a seeded sample)
PROBE_TILES_PER_SLIDE = 20


def cohort_confounders(
    run: RunFolder, tiles: pd.DataFrame, cfg: ScoreConfig, outputs: list, *, cohort_row: int
) -> list:
    """Run the scan and the site tests, write their files (appended to ``outputs``) and return the
    notes in words (no labels, missing or constant columns, no site column, too few slides)."""
    from wsi_explain.metrics.confounders import SITE_LIKE, scan_confounders

    cdir = run.path / "cohort"
    scan, notes = scan_confounders(
        tiles, nuisance=cfg.nuisance, n_boot=cfg.n_boot, seed=cfg.seed, cohort_row=cohort_row
    )
    site_col = next((c for c in SITE_LIKE if c in tiles.columns and tiles[c].nunique() > 1), None)
    if site_col is None:
        notes.append("no site column with 2 or more values: no site-leakage probe")
    else:
        notes += _site_tests(run, tiles, site_col, cfg, outputs)
    if "label_pos" in tiles.columns and tiles["label_pos"].notna().any():
        _errors(run, tiles, outputs)
    else:
        notes.append("no labels: no error-aware ranking of the clusters")
    atomic_write_parquet(scan, cdir / "confounders.parquet", {"notes": notes, "cohort_row": cohort_row})
    outputs.append("cohort/confounders.parquet")
    return notes


def _errors(run: RunFolder, tiles: pd.DataFrame, outputs: list) -> None:
    """``error_clusters.parquet``: the clusters ranked by the errors they hold beyond the cohort's
    rate, with the removal effect of clustering (max change of a slide's top-8 score) beside it."""
    from wsi_explain.metrics.leakage import error_clusters

    err = error_clusters(tiles["cluster"], tiles["prob_pos"], tiles["label_pos"])
    summary = run.path / "cohort" / "clusters.parquet"
    if summary.exists():
        eff = pd.read_parquet(summary, columns=["cluster", "removal_effect"])
        err = err.merge(eff, on="cluster", how="left").sort_values(["excess_errors", "removal_effect"], ascending=False)
    atomic_write_parquet(err.reset_index(drop=True), run.path / "cohort" / "error_clusters.parquet")
    outputs.append("cohort/error_clusters.parquet")


def _site_tests(run: RunFolder, tiles: pd.DataFrame, site_col: str, cfg: ScoreConfig, outputs: list) -> list:
    from wsi_explain.metrics.leakage import site_composition, site_probe

    cdir = run.path / "cohort"
    known = tiles[tiles[site_col].notna()]
    comp = site_composition(known["cluster"], known[site_col], known["slide_id"], n_perm=cfg.n_boot, seed=cfg.seed)
    atomic_write_parquet(comp, cdir / "site_composition.parquet", {"site_column": site_col})
    sample, emb = _embeddings(run, known, cfg.seed)
    probe = site_probe(emb, sample[site_col].to_numpy(), sample["slide_id"].to_numpy(), seed=cfg.seed)
    atomic_write_json(cdir / "site_leakage.json", {"site_column": site_col, **probe})
    outputs += ["cohort/site_composition.parquet", "cohort/site_leakage.json"]
    return [f"site probe: {probe['note']}"] if probe["note"] else []


def _embeddings(run: RunFolder, tiles: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A seeded sample of at most :data:`PROBE_TILES_PER_SLIDE` tiles per slide and their stored
    embeddings (n, D) float32, read from each slide's ``features.zarr``."""
    from wsi_explain.io.features import open_store

    rng = np.random.default_rng(seed)
    rows, embs = [], []
    for sid, g in tiles.groupby("slide_id", sort=True):
        pick = g.iloc[np.sort(rng.permutation(len(g))[:PROBE_TILES_PER_SLIDE])]
        store = open_store(run.slide_dir(sid) / "features.zarr")
        embs.append(np.asarray(store["embeddings"].oindex[pick["tile_id"].to_numpy(np.int64)], np.float32))
        rows.append(pick)
    return pd.concat(rows, ignore_index=True), np.concatenate(embs)
