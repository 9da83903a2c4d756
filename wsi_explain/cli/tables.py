"""The summary tables the commands print when a stage ends (rich tables over stage results)."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "print_tile_summary",
    "print_extract_summary",
    "print_cluster_summary",
    "print_score_summary",
    "print_confounders",
]


def _table(title: str, columns: tuple[str, ...]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def print_tile_summary(results, console) -> int:
    """One row per slide; returns the number of failed slides."""
    table = _table("Tiling", ("slide", "status", "tiles", "tissue %", "under ink %", "seconds", "error / note"))
    for r in results:
        colour = {"done": "green", "skipped": "cyan", "failed": "red"}[r.status]
        qc = r.qc or {}
        table.add_row(
            r.slide_id,
            f"[{colour}]{r.status}[/]",
            str(r.n_tiles),
            f"{100 * r.tissue_frac:.1f}",
            f"{100 * qc['ink_on_tissue']:.1f}" if "ink_on_tissue" in qc else "",
            f"{r.seconds:.2f}",
            r.error or qc.get("note", ""),
        )
    console.print(table)
    failed = sum(r.status == "failed" for r in results)
    done = len(results) - failed
    console.print(f"{done} slide(s) tiled, {failed} failed; {sum(r.n_tiles for r in results)} tiles in all")
    return failed


def print_extract_summary(results, console) -> int:
    """One row per slide; returns the number of failed slides."""
    table = _table("Extraction", ("slide", "status", "tiles", "decode errors", "non-finite", "tiles/s", "error"))
    for r in results:
        table.add_row(
            r.slide_id,
            r.status,
            str(r.n_tiles),
            str(r.n_read_errors),
            str(r.n_nonfinite),
            f"{r.tiles_per_s:.1f}" if r.tiles_per_s else "",
            r.error or "",
        )
    console.print(table)
    failed = sum(r.status == "failed" for r in results)
    console.print(f"{len(results) - failed} slide(s) extracted, {failed} failed")
    return failed


def print_cluster_summary(run_path: Path, out, console) -> None:
    """One row per cluster (``cohort/clusters.parquet``) and the step timings."""
    import pandas as pd

    if out.status == "skipped":
        console.print("clustering already done with the same inputs and parameters (skipped)")
    summary = pd.read_parquet(Path(run_path) / "cohort" / "clusters.parquet")
    title = f"{out.n_tiles} tiles, {out.n_clusters} clusters, {out.n_noise} noise, {out.flagged} flagged"
    table = _table(title, ("cluster", "size", "slides", "positive rate", "confidence", "flags"))
    for _, r in summary.iterrows():
        table.add_row(
            str(r["cluster"]),
            str(r["size"]),
            str(r["n_slides"]),
            f"{r['positive_rate']:.2f}",
            f"{r['mean_confidence']:.2f}",
            "; ".join(r["flag_reasons"]),
        )
    console.print(table)
    from wsi_explain.report.sentences import slice_sentences

    for line in slice_sentences(Path(run_path) / "cohort"):  # artefacts the model leans on, across clusters
        console.print(line, highlight=False)
    if out.timings:
        console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in out.timings.items()))


def print_score_summary(run_path: Path, out, console) -> None:
    """The cohort-level metrics with their intervals, and the sanity verdict per method."""
    import pandas as pd

    from wsi_explain.stages.score import COHORT_ROW

    if out.status == "skipped":
        console.print("scoring already done with the same inputs and parameters (skipped)")
    cm = pd.read_parquet(Path(run_path) / "cohort" / "cluster_metrics.parquet")
    cohort = cm[(cm.cluster == COHORT_ROW)]
    title = f"cohort-level metrics ({out.n_sampled} sampled tiles; per-cluster rows in cohort/cluster_metrics.parquet)"
    table = _table(title, ("method", "metric", "value", "95% CI", "tiles"))
    for _, r in cohort.iterrows():
        table.add_row(
            r["method"], r["metric"], f"{r['value']:.3g}", f"[{r['ci_low']:.3g}, {r['ci_high']:.3g}]", str(r["n_tiles"])
        )
    console.print(table)
    for note in getattr(out, "notes", []):  # what some clusters' scores rest on
        console.print(f"note: {note}", highlight=False)
    from wsi_explain.report.sentences import gain_sentences

    for line in gain_sentences(cohort):
        console.print(line)
    print_confounders(run_path, console)
    for m, v in out.sanity.items():
        verdict = "passes" if v["passed"] else "FAILS"
        console.print(
            f"randomisation sanity check: {m} {verdict} (Spearman {v['spearman']:.2f}, "
            f"SSIM {v['ssim']:.2f} after full randomisation)"
        )


def print_confounders(run_path: Path, console) -> None:
    """The confounder scan and the site tests in words, with their notes; nothing when the run has
    no scan."""
    from wsi_explain.report.sentences import shortcut_lines

    lines = shortcut_lines(Path(run_path) / "cohort")
    if lines is None:
        return
    for line in ["confounder scan (within label strata, intervals over slides):"] + lines:
        console.print(line, highlight=False)
