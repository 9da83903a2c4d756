"""``wsi-explain selftest RUN``: plant known shortcuts into the run's own tiles and report what the
audit finds (recall, precision, removal and scan ranks per plant kind; false flags of a control)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_explain.cli.app import app
from wsi_explain.cli.console import csv as _csv
from wsi_explain.cli.console import exits_on_error, make_config, open_run, require_run, setup_logging, step_status


def print_selftest(run_path: Path, console) -> None:
    """The self-test's table and sentences; nothing when the run has none."""
    from wsi_explain.cli.tables import _table
    from wsi_explain.report.selftest_text import SELFTEST_HEADER, read_selftest, selftest_rows, selftest_sentences

    figures = read_selftest(Path(run_path) / "cohort")
    if figures is None:
        return
    table = _table("self-test: planted shortcuts and what the audit found", SELFTEST_HEADER)
    for row in selftest_rows(figures):
        table.add_row(*row)
    console.print(table)
    for line in selftest_sentences(figures):
        console.print(line, highlight=False)


@app.command()
def selftest(
    run: Path = typer.Argument(..., help="Run folder (tiled and extracted)."),
    n_slides: int = typer.Option(18, help="Slides of the planted cohort (cycling through the plant kinds)."),
    tiles_per_slide: int = typer.Option(25, help="Tiles per planted slide (a 5 x 5 mosaic)."),
    kinds: str = typer.Option("ink,blur,stain", help="Comma-separated plant kinds: ink, blur, stain."),
    control: bool = typer.Option(True, help="Also audit the same cohort with nothing planted (false flags)."),
    workers: int = typer.Option(2, help="Tile-reading threads."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Plant pen ink, blur and a stain shift into copies of the run's clean tiles, correlated with a
    synthetic label; fit a shortcut head on the run's model (on a training cohort of its own); run
    tiling, extraction, clustering with its flags, artefact slices, cluster removal and the
    confounder scan on that cohort; report per plant kind how much of it the audit finds
    (cohort/selftest.json)."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.core.stage_configs import SelftestConfig
    from wsi_explain.stages.selftest import run_selftest

    cfg = make_config(
        SelftestConfig,
        "selftest",
        n_slides=n_slides,
        tiles_per_slide=tiles_per_slide,
        kinds=_csv(kinds),
        control=control,
        seed=seed,
    )
    require_run(run, "run `wsi-explain run` or tile and extract first")
    console = Console()
    with open_run(run) as rf, exits_on_error():
        run_selftest(rf, cfg, workers=workers, step=lambda msg: step_status(console, msg))
    print_selftest(run, console)
