"""Cohort and per-slide HTML reports of a run (``wsi-explain report``).

``report/index.html`` (the linked explorer, cluster table, metrics with intervals, ensemble and
sanity plots, cluster removal, what the pathologists' artefact verdicts do to the slide scores,
concepts, flags and failures in words), ``report/clusters/<c>.html``
(representative and borderline tiles with their maps, composition, metrics) and
``report/slides/<id>.html`` (thumbnail, prediction heatmap, cluster map, the slide's tiles per
cluster with CAM overlays, slide scores). BokehJS is copied to ``report/static``. What each page
shows is gathered in :mod:`wsi_explain.report.build` and laid out by the autoescaped templates of
``wsi_explain/report/templates``; this module builds the pages in a temporary folder, swaps it in
and records the stage.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import viz
from wsi_explain.core.run import STAGES, RunFolder, now_iso
from wsi_explain.report.build import ReportContext, cluster_page, failures, index_page
from wsi_explain.report.slide_page import slide_page
from wsi_explain.report.verdicts import effect_sentence

__all__ = ["run_report_stage", "verdict_effect", "ReportOutcome", "STAGE"]

logger = logging.getLogger(__name__)

STAGE = STAGES[4]  # "report"
COHORT = "cohort"


@dataclass
class ReportOutcome:
    status: str
    index: Path
    n_pages: int
    n_images: int
    seconds: float


def verdict_effect(run_path: str | Path, *, topk: int = 8, tiles=None) -> dict | None:
    """What removing the clusters marked as artefacts (pathologists' verdicts) does to the slide
    scores (top-``topk`` mean and mean positive probability) and the cohort AUC, from the stored
    probabilities (``tiles``: the cohort tile table when the caller has read it already, else
    ``cohort/tiles.parquet``). None when no cluster has an artefact verdict or the run is not
    clustered.

    Returns
    -------
    dict: the summary of :func:`wsi_explain.metrics.group_removal`, ``clusters`` ({id: verdict}),
    ``topk`` and ``slides`` (its per-slide table as records, largest change first).
    """
    import pandas as pd

    from wsi_explain.metrics.removal import group_removal, slide_labels
    from wsi_explain.report.verdicts import artefact_clusters

    marked = artefact_clusters(run_path)
    src = Path(run_path) / "cohort" / "tiles.parquet"
    if not marked or (tiles is None and not src.exists()):
        return None
    tiles = pd.read_parquet(src) if tiles is None else tiles
    per_slide, summary = group_removal(tiles, marked, slide_labels=slide_labels(tiles), topk=topk)
    return {**summary, "clusters": marked, "topk": topk, "slides": per_slide.to_dict("records")}


def run_report_stage(
    run: RunFolder,
    *,
    max_points: int = 200_000,
    thumb_px: int = 128,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> ReportOutcome:
    """Write the cohort report, one page per cluster and one per slide (always rebuilt: names and
    metrics may have changed). Needs a clustered run; metrics appear when the run is scored."""
    from wsi_explain.core.errors import WsiExplainError

    t0 = time.perf_counter()
    if not (run.path / "cohort" / "tiles.parquet").exists():
        raise WsiExplainError(f"{run.path}: not clustered; run `wsi-explain cluster` first")
    progress = on_progress or (lambda what, done, total: None)
    final = run.path / "report"
    out = run.path / ".report.tmp"
    shutil.rmtree(out, ignore_errors=True)
    viz.copy_bokeh_js(out / "static")
    ctx = ReportContext(run, out, max_points, thumb_px)
    ctx.verdict_effect = effect_sentence(verdict_effect(run.path, tiles=ctx.tiles), ctx.names) or None
    start = now_iso()
    clusters = list(ctx.clusters.itertuples(index=False))
    slides = sorted(ctx.tiles["slide_id"].unique())
    total = 1 + len(clusters) + len(slides)
    progress("report pages", 0, total)
    index_page(ctx, failures(run))
    done = 1
    for r in ctx.clusters.to_dict("records"):
        cluster_page(ctx, r)
        done += 1
        progress("report pages", done, total)
    for sid in slides:
        slide_page(ctx, sid)
        done += 1
        progress("report pages", done, total)
    if final.exists():
        old = run.path / ".report.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        out.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.rename(final)
    res = ReportOutcome("done", final / "index.html", total, len(ctx.written), time.perf_counter() - t0)
    run.record(
        STAGE,
        COHORT,
        status="done",
        outputs=["report/index.html"],
        n_pages=total,
        n_images=len(ctx.written),
        start=start,
        end=now_iso(),
        seconds=round(res.seconds, 3),
        error=None,
    )
    return res
