"""Commands over a whole run: ``report``, ``serve``, ``export``, ``status``, ``run``, ``demo``."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import typer

from wsi_explain.cli.app import app
from wsi_explain.cli.console import csv as _csv
from wsi_explain.cli.console import (
    exits_on_error,
    fail,
    make_config,
    open_run,
    progress_bar,
    setup_logging,
    step_status,
)
from wsi_explain.cli.stage_commands import _run_tiling, _tile_config


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run folder (clustered; scored runs also show metrics)."),
    max_points: int = typer.Option(200_000, help="Most tiles drawn in the report's UMAP (a stratified sample beyond)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Write report/index.html (cohort), report/clusters/*.html and report/slides/*.html."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.stages.report import run_report_stage

    console = Console()
    rf = open_run(run)
    with rf, progress_bar(console=console) as bar, exits_on_error():
        task = bar.add_task("report pages", total=None)
        out = run_report_stage(
            rf, max_points=max_points, on_progress=lambda w, d, t: bar.update(task, completed=d, total=t)
        )
    console.print(f"report: {out.index} ({out.n_pages} pages, {out.n_images} tile images, {out.seconds:.1f} s)")


@app.command()
def serve(
    run: Path = typer.Argument(..., help="Run folder (clustered)."),
    port: int = typer.Option(5006, help="Port."),
    address: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    allow_origin: list[str] | None = typer.Option(
        None, help="Extra host:port allowed to open the websocket (when proxied)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the linked explorer (UMAP, slide panel, gallery, cluster table, naming) until Ctrl-C."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.report.serve import make_server

    with exits_on_error():
        server = make_server(run, port=port, address=address, allow_origin=allow_origin)
    if address not in ("127.0.0.1", "localhost", "::1"):
        Console(stderr=True).print(f"warning: serving on {address}: anyone who can reach this machine can open the run")
    server.start()
    Console().print(
        f"explorer: http://{'127.0.0.1' if address in ('0.0.0.0', '') else address}:{port}/explorer (Ctrl-C stops)"
    )
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass


@app.command()
def export(run: Path = typer.Argument(..., help="Run folder (clustered).")) -> None:
    """Write exports/<slide>.geojson (tiles as QuPath detections, classified by cluster) and
    exports/cohort_tiles.csv."""
    from rich.console import Console

    from wsi_explain.report.export import export_run

    with open_run(run) as rf, exits_on_error():
        paths = export_run(rf)
    Console().print(f"wrote {len(paths) - 1} GeoJSON file(s) and {paths[-1]}")


@app.command()
def status(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Print each stage and slide of a run with its state, counts and errors, then the confounder
    scan and the self-test in words when the run has them."""
    from rich.console import Console
    from rich.table import Table

    from wsi_explain.core.errors import ManifestError
    from wsi_explain.core.run import RunFolder

    with exits_on_error(ManifestError):
        rf = RunFolder(run, readonly=True)
    console = Console()
    if not rf.manifest["stages"]:
        console.print(f"{rf.path}: no stage has run yet")
        return
    for name, stage in rf.manifest["stages"].items():
        table = Table(title=f"stage: {name}")
        slides = stage.get("slides", {})
        timed = any(rec.get("timings") for rec in slides.values())  # extraction records its parts
        cols = ("slide", "status", "tiles", "seconds") + (("where the time went (s)",) if timed else ()) + ("error",)
        for col in cols:
            table.add_column(col, overflow="fold")
        for sid, rec in slides.items():
            parts = {k: v for k, v in (rec.get("timings") or {}).items() if k != "wall"}
            row = [sid, rec.get("status", "?"), str(rec.get("n_tiles", "")), str(rec.get("seconds", ""))]
            row += [", ".join(f"{k} {v:.1f}" for k, v in parts.items())] if timed else []
            table.add_row(*row, rec.get("error") or "")
        console.print(table)
        for sid, rec in slides.items():  # below the table, so that they do not squeeze its columns
            if rec.get("problems"):
                console.print(f"{sid}: {_problems(rec['problems'])}", highlight=False, markup=False)
    from wsi_explain.cli.selftest_command import print_selftest
    from wsi_explain.cli.tables import print_confounders

    print_confounders(rf.path, console)  # what the score stage and the self-test found, in words
    print_selftest(rf.path, console)


def _problems(problems: list[str], show: int = 2) -> str:
    """A slide's recorded problems (tiles that failed to decode, incomplete IG maps...), the first
    ``show`` of them in full."""
    more = f" (+{len(problems) - show} more)" if len(problems) > show else ""
    return f"{len(problems)} problem(s): " + "; ".join(problems[:show]) + more


def _print_run_summary(res, cfg, console) -> None:
    """Failed slides, the confounder scan, the self-test, where the report and the run are."""
    for sid, err in res.failed_slides.items():
        console.print(f"[red]failed[/] {sid}: {err}", highlight=False)
    from wsi_explain.cli.tables import print_confounders

    print_confounders(res.run, console)
    if cfg.selftest is not None:
        from wsi_explain.cli.selftest_command import print_selftest

        print_selftest(res.run, console)
    if cfg.mil is not None:
        from wsi_explain.cli.mil_command import print_mil

        print_mil(res.run, console)
    if res.report:
        console.print(f"report: {res.report}")
    console.print(f"run folder: {res.run.resolve()}  (wsi-explain status {res.run})")


@app.command("run")
def run_cmd(
    config: Path | None = typer.Argument(None, help="YAML run config (see README); options below override it."),
    slides: list[str] | None = typer.Option(None, "--slides", help="Slide files, folders or cohort CSVs (repeat)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Architecture: torchvision name, efficientnet_lite0, export (.pt2), torchscript, pkg.module:factory.",
    ),
    weights: str | None = typer.Option(None, help="Checkpoint (weights_only), torch.export .pt2 or TorchScript file."),
    num_classes: int | None = typer.Option(None, help="Classes of the model (or from its model card)."),
    methods: str | None = typer.Option(None, help="Comma-separated attribution methods."),
    tile_px: int | None = typer.Option(None, help="Tile size in pixels."),
    mpp_target: float | None = typer.Option(None, help="Tile resolution, µm per pixel."),
    mpp: float | None = typer.Option(None, help="Level-0 µm/px for files that lack it."),
    positive_labels: str | None = typer.Option(None, help="Comma-separated annotation classes that are positive."),
    per_cluster: int | None = typer.Option(None, help="Tiles sampled per cluster for the expensive metrics."),
    stages: str | None = typer.Option(
        None, help="Comma-separated stages (default: tile,extract,cluster,score,report)."
    ),
    workers: int | None = typer.Option(
        None, help="Dask LocalCluster worker processes for tiling and extraction (1 = serial)."
    ),
    scheduler: str | None = typer.Option(None, help="Existing Dask scheduler, tcp://host:port."),
    selftest: bool = typer.Option(
        False, help="Also run the self-test (planted shortcuts; or a selftest: section in the run config)."
    ),
    mil_head: str | None = typer.Option(
        None, help="Also explain a slide-level MIL head: abmil, gated_abmil, clam_sb, pkg.module:factory or a file."
    ),
    mil_weights: str | None = typer.Option(None, help="State dict of the MIL head."),
    mil_classes: int | None = typer.Option(None, help="Classes of the MIL head (default 2)."),
    mil_target: int | None = typer.Option(None, help="Class of the MIL head whose logit is explained (default 1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The whole audit: tile, extract, cluster, score and report, skipping what is already done
    (with --selftest and --mil-head, also the self-test and a MIL head, before the report)."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.stages.pipeline import PipelineConfig, read_pipeline_yaml, run_pipeline

    def section(base: dict, **kw) -> dict:
        return {**base, **{k: v for k, v in kw.items() if v is not None}}

    with exits_on_error():
        doc = read_pipeline_yaml(config) if config else {}
    doc = section(
        doc,
        slides=list(slides) if slides else None,
        out=str(out) if out else None,
        workers=workers,
        scheduler=scheduler,
        mpp=mpp,
        stages=list(_csv(stages)) or None,
    )
    doc["tile"] = section(doc.get("tile") or {}, tile_px=tile_px, mpp_target=mpp_target)
    doc["extract"] = section(
        doc.get("extract") or {},
        arch=model,
        weights=weights,
        num_classes=num_classes,
        methods=list(_csv(methods)) or None,
    )
    doc["cluster"] = section(doc.get("cluster") or {}, positive_labels=list(_csv(positive_labels)) or None)
    doc["score"] = section(doc.get("score") or {}, per_cluster=per_cluster)
    if selftest or ("selftest" in doc and doc["selftest"] is None):  # a bare `selftest:` in the YAML
        doc["selftest"] = doc.get("selftest") or {}
    if mil_head or doc.get("mil"):
        doc["mil"] = section(
            doc.get("mil") or {}, head=mil_head, weights=mil_weights, n_classes=mil_classes, target=mil_target
        )
    if not doc.get("slides") or not doc.get("out"):
        fail("give --slides and --out (or a run config with slides: and out:)")
    cfg = make_config(PipelineConfig, "run", **doc)
    console = Console()
    with progress_bar(console=console) as bar:
        tasks: dict[str, int] = {}

        def on_event(stage: str, msg: str) -> None:
            if msg.startswith(("finished", "started")) or ": failed" in msg:
                console.print(f"[bold]{stage}[/]: {msg}", highlight=False)
            counted = re.fullmatch(r"(.+) (\d+)/(\d+)", msg)  # "sampled metrics 3/10": a bar per step
            if counted:
                what, done, total = f"{stage}: {counted[1]}", int(counted[2]), int(counted[3])
                if what not in tasks:
                    tasks[what] = bar.add_task(what, total=total)
                bar.update(tasks[what], completed=done, total=total)

        with exits_on_error():
            res = run_pipeline(cfg, on_event=on_event)
    _print_run_summary(res, cfg, console)
    raise typer.Exit(1 if res.failed_slides else 0)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder."),
    n_slides: int = typer.Option(7, help="Number of demo slides (the 7th is a held-out negative slide with ink)."),
    workers: int = typer.Option(2, help="Tile-reading threads."),
    per_cluster: int = typer.Option(12, help="Tiles per cluster for the expensive metrics."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Build a demo cohort from real H&E (CMU-1 small region) with pen ink on positive slides,
    fit a 2-class head on EfficientNet-Lite0 (ImageNet) that learns the ink shortcut, and run the
    whole audit: tile, extract, cluster, score, report."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.demo.audit import DEMO_TILE_MPP, print_demo_summary, run_demo_audit
    from wsi_explain.demo.data import build_demo_cohort, find_demo_source

    console = Console()
    src = find_demo_source()
    console.print(f"demo source: {src or 'synthetic H&E-like texture (CMU-1-Small-Region.svs not found)'}")
    slides_dir = Path(out) / "demo_slides"
    with step_status(console, "building demo slides"):
        build_demo_cohort(slides_dir, n_slides=n_slides, seed=seed)
    failed = _run_tiling([str(slides_dir / "cohort.csv")], out, None, _tile_config(mpp_target=DEMO_TILE_MPP))
    with open_run(out) as run, progress_bar(console=console, rate=True) as bar:
        tasks: dict[str, int] = {}

        def on_progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        @contextlib.contextmanager
        def status(message: str):
            task = bar.add_task(message, total=1)
            yield
            bar.update(task, completed=1)

        res = run_demo_audit(
            run, Path(out), workers=workers, per_cluster=per_cluster, seed=seed, status=status, on_progress=on_progress
        )
    print_demo_summary(Path(out), res, console)
    raise typer.Exit(1 if failed or res.failed_slides else 0)
