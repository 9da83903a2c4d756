"""``wsi-explain verdicts RUN``: the clusters' names and verdicts, what the artefact verdicts do to the
slide scores, and their exchange between pathologists (export, import, compare)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_explain.cli.app import app
from wsi_explain.cli.console import exits_on_error, require_run, setup_logging


def _cluster_ids(run: Path) -> list[int] | None:
    import pandas as pd

    src = run / "cohort" / "clusters.parquet"
    return [int(c) for c in pd.read_parquet(src, columns=["cluster"])["cluster"]] if src.exists() else None


def print_verdicts(run: Path, console) -> None:
    """The verdict table and the effect of the artefact verdicts, in words."""
    from wsi_explain.cli.tables import _table
    from wsi_explain.report.names import read_cluster_names
    from wsi_explain.report.verdicts import effect_sentence
    from wsi_explain.stages.report import verdict_effect

    doc = read_cluster_names(run)
    keys = sorted({*doc["names"], *doc["verdicts"]}, key=int)
    if not keys:
        console.print("no cluster has a name or a verdict yet (the explorer of `wsi-explain serve` saves them)")
        return
    table = _table(f"cluster verdicts (version {doc['version']})", ("cluster", "name", "verdict", "comment"))
    for k in keys:
        table.add_row(k, doc["names"].get(k, ""), doc["verdicts"].get(k, ""), doc["comments"].get(k, ""))
    console.print(table)
    names = {int(k): v for k, v in doc["names"].items()}
    sentence = effect_sentence(verdict_effect(run), names)
    console.print(sentence or "no cluster is marked as an artefact", highlight=False)


@app.command()
def verdicts(
    run: Path = typer.Argument(..., help="Run folder (clustered)."),
    export: Path = typer.Option(None, "--export", help="Write the names, comments and verdicts to this JSON file."),
    import_: Path = typer.Option(
        None, "--import", help="Apply an exported file (each cluster a new version, the file named as author)."
    ),
    compare: Path = typer.Option(None, "--compare", help="Compare the run's verdicts with an exported file's."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Show the clusters' verdicts and what removing the clusters marked as artefacts does to the
    slide scores and the cohort AUC; export, import or compare verdicts (two pathologists)."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.report import verdicts as V

    require_run(run)
    console = Console()
    with exits_on_error():
        if import_ is not None:
            doc = V.import_verdicts(run, import_, clusters=_cluster_ids(run))
            console.print(f"imported {import_} (names version {doc['version']})")
        if compare is not None:
            from wsi_explain.cli.tables import _table
            from wsi_explain.report.names import read_cluster_names

            mine = read_cluster_names(run)["verdicts"]
            theirs = {str(c): e["verdict"] for c, e in V._read_export(compare).items()}
            table, s = V.compare_verdicts(mine, theirs)
            out = _table(f"verdicts: {run.name} against {compare.name}", ("cluster", "this run", "file", "agree"))
            for r in table.itertuples():
                out.add_row(str(r.cluster), r.a, r.b, "-" if r.agree != r.agree else ("yes" if r.agree else "NO"))
            console.print(out)
            kappa = "undefined" if s["kappa"] != s["kappa"] else f"{s['kappa']:.2f}"
            agree = "-" if s["n_both"] == 0 else f"{100 * s['agreement']:.0f}%"
            console.print(f"{s['n_both']} clusters judged by both: agreement {agree}, Cohen's kappa {kappa}")
        if export is not None:
            console.print(f"wrote {V.export_verdicts(run, export)}")
        if compare is None:
            print_verdicts(run, console)
