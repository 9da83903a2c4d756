"""The ``wsi-explain`` command line: thin typer commands over library functions.

Heavy imports live inside the commands so that ``wsi-explain --help`` is instant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Explain what a whole-slide classifier has learned.")

logger = logging.getLogger("wsi_explain")


def _setup_logging(verbose: bool) -> None:
    # Configure the application's logger only (never the root logger), for the CLI process.
    from rich.logging import RichHandler

    log = logging.getLogger("wsi_explain")
    if not log.handlers:
        log.addHandler(RichHandler(show_path=False, markup=False))
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("tiling", "clustering", "viz"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(RichHandler(show_path=False, markup=False))
        lg.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _fail(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {msg}", markup=True, highlight=False)
    raise typer.Exit(2)


def _config(cls, what: str, **kw):
    """Build a validated config, or exit 2 with every problem listed."""
    from pydantic import ValidationError

    try:
        return cls(**kw)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        _fail(f"invalid {what} parameters: {errs}")


def _open_run(path: Path):
    """The run folder opened for writing, or exit 2 with the reason (locked, bad manifest)."""
    from wsi_explain.core.errors import ManifestError, RunLockedError
    from wsi_explain.core.run import RunFolder

    try:
        return RunFolder(path)
    except (RunLockedError, ManifestError) as exc:
        _fail(str(exc))


def _tile_config(**kw):
    from wsi_explain.core.config import TileConfig

    return _config(TileConfig, "tiling", **{k: v for k, v in kw.items() if v is not None})


def _print_tile_summary(results) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Tiling")
    for col in ("slide", "status", "tiles", "tissue %", "under ink %", "seconds", "error / note"):
        table.add_column(col, overflow="fold")
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
    Console().print(table)
    failed = sum(r.status == "failed" for r in results)
    done = len(results) - failed
    Console().print(f"{done} slide(s) tiled, {failed} failed; {sum(r.n_tiles for r in results)} tiles in all")
    return failed


def _run_tiling(slides: list[str], out: Path, mpp: Optional[float], cfg) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wsi_explain.core.errors import SlideListError
    from wsi_explain.io.slides import discover_slides
    from wsi_explain.stages.tile import run_tile_stage

    try:
        sources = discover_slides(slides, mpp=mpp)
    except SlideListError as exc:
        _fail(str(exc))
    run = _open_run(out)
    with run, Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        task = progress.add_task("tiling", total=len(sources))

        def on_slide(res):
            progress.update(task, advance=1, description=f"tiling {res.slide_id}")

        results = run_tile_stage(run, sources, cfg, on_slide=on_slide)
    return _print_tile_summary(results)


@app.command()
def tile(
    slides: list[str] = typer.Argument(..., help="Slide files, folders of slides, or a cohort CSV (column 'path')."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    mpp_target: Optional[float] = typer.Option(0.5, help="Target µm per pixel of the tiles."),
    magnification: Optional[float] = typer.Option(None, help="Target magnification instead of --mpp-target (10/mag µm)."),
    tile_px: int = typer.Option(224, help="Tile edge in pixels."),
    overlap: int = typer.Option(0, help="Overlap of neighbouring tiles in pixels."),
    min_tissue: float = typer.Option(0.5, help="Minimum tissue fraction of a tile."),
    mpp: Optional[float] = typer.Option(None, help="Level-0 µm per pixel, overriding the files' own."),
    verify: str = typer.Option("sample", help="Read tiles to catch decode errors: none, sample or all."),
    label_preset: Optional[str] = typer.Option(None, help="Class names of label masks: panda-radboud or panda-karolinska."),
    find_ink: bool = typer.Option(True, help="Detect pen ink (tissue under ink stays in the grid, with its ink fraction)."),
    qc: bool = typer.Option(True, help="Measure every tile: sharpness, H and E optical density, brightness."),
    drop_artefacts: bool = typer.Option(False, help="Leave tiles with ink fraction >= 0.05 or sharpness < 0.06 out of the grid."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Tile slides into RUN/slides/<id>/tiles.parquet (+ a thumbnail with the grid)."""
    _setup_logging(verbose)
    classes = None
    if label_preset:
        import tiling

        presets = {"panda-radboud": tiling.PANDA_RADBOUD, "panda-karolinska": tiling.PANDA_KAROLINSKA}
        if label_preset not in presets:
            _fail(f"unknown --label-preset {label_preset!r}; choose one of {sorted(presets)}")
        classes = presets[label_preset]
    cfg = _tile_config(
        tile_px=tile_px,
        mpp_target=None if magnification else mpp_target,
        magnification=magnification,
        overlap=overlap,
        min_tissue=min_tissue,
        verify=verify,
        label_classes=classes,
        find_ink=find_ink,
        qc=qc,
        drop_artefacts=drop_artefacts,
    )
    failed = _run_tiling(slides, out, mpp, cfg)
    raise typer.Exit(1 if failed else 0)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TilesPerSecond(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.1f} tiles/s" if task.speed else "- tiles/s")

    return TilesPerSecond()


@app.command()
def extract(
    run: Path = typer.Argument(..., help="Run folder (tiled)."),
    model: str = typer.Option("resnet18", "--model", "-m", help="torchvision name, efficientnet_lite0, torchscript, or pkg.module:factory."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint (state dict) or TorchScript file."),
    ensemble: list[Path] = typer.Option([], help="More checkpoints of the same architecture (repeat the option)."),
    num_classes: Optional[int] = typer.Option(None, help="Number of classes (else from the model card)."),
    class_names: Optional[str] = typer.Option(None, help="Comma-separated class names."),
    card: Optional[Path] = typer.Option(None, help="Model card (YAML/JSON); default: beside the weights."),
    trust_checkpoint: bool = typer.Option(False, help="Allow full unpickling of a checkpoint (runs code from the file!)."),
    methods: str = typer.Option("gradcam,gradcampp,xgradcam,hirescam,layercam,eigencam", help="Comma-separated methods: fused CAMs and/or captum / grad-cam methods."),
    target: str = typer.Option("pred", help="Class the maps explain: pred, a class index or a class name."),
    target_layer: Optional[str] = typer.Option(None, help="CAM layer (module name); default: last conv block."),
    embedding_layer: Optional[str] = typer.Option(None, help="Layer whose input is the embedding; default: final classifier."),
    activations: bool = typer.Option(False, help="Store spatial activations (for concepts)."),
    attr_sample: int = typer.Option(64, help="Tiles per slide for non-fused methods (0 = all)."),
    batch_size: int = typer.Option(32),
    workers: int = typer.Option(2, help="Tile-reading threads or processes (0: read in the main thread)."),
    reader: str = typer.Option("auto", help="auto (threads on CPU, processes on CUDA), threads or processes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the model over every tile: predictions, embeddings and CAMs into slides/<id>/features.zarr."""
    _setup_logging(verbose)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.stages.extract import run_extract_stage

    cfg = _config(
            ExtractConfig, "extraction",
            arch=model, weights=str(weights) if weights else None, ensemble=tuple(str(e) for e in ensemble),
            num_classes=num_classes, class_names=tuple(class_names.split(",")) if class_names else None,
            card=str(card) if card else None, trust_checkpoint=trust_checkpoint,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()), target=target,
            target_layer=target_layer, embedding_layer=embedding_layer, activations=activations,
            attr_sample=attr_sample, batch_size=batch_size, workers=workers, reader=reader, device=device, seed=seed,
    )
    rf = _open_run(run)
    console = Console()
    with rf:
        total = sum(r.get("n_tiles", 0) for r in rf.stage("tile")["slides"].values() if r.get("status") == "done")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _rate_column(), TimeElapsedColumn()) as progress:
            task = progress.add_task("extracting", total=total)
            try:
                results = run_extract_stage(
                    rf, cfg, on_tiles=lambda k: progress.advance(task, k),
                    on_slide=lambda r: progress.update(task, description=f"extracting ({r.slide_id} {r.status})"),
                )
            except WsiExplainError as exc:
                _fail(str(exc))
    from rich.table import Table

    table = Table(title="Extraction")
    for col in ("slide", "status", "tiles", "decode errors", "non-finite", "tiles/s", "error"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r.slide_id, r.status, str(r.n_tiles), str(r.n_read_errors), str(r.n_nonfinite),
                      f"{r.tiles_per_s:.1f}" if r.tiles_per_s else "", r.error or "")
    console.print(table)
    failed = sum(r.status == "failed" for r in results)
    console.print(f"{len(results) - failed} slide(s) extracted, {failed} failed")
    raise typer.Exit(1 if failed else 0)


@app.command()
def cluster(
    run: Path = typer.Argument(..., help="Run folder (extracted)."),
    method: str = typer.Option("hdbscan", help="hdbscan or kmeans."),
    k: int = typer.Option(8, "-k", help="Clusters for k-means."),
    min_cluster_size: Optional[int] = typer.Option(None, help="HDBSCAN min_cluster_size (default: n/50 within 5-100)."),
    pca: int = typer.Option(50, help="PCA dimensions before the k-NN (0 = none)."),
    l2: bool = typer.Option(True, "--l2/--no-l2", help="L2-normalise embeddings (after PCA)."),
    n_neighbors: int = typer.Option(15, help="UMAP neighbours (the k of the FAISS graph)."),
    concepts: int = typer.Option(0, help="NMF concept prototypes (needs extract --activations)."),
    positive_labels: Optional[str] = typer.Option(None, help="Comma-separated annotation classes that are positive."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Cluster every tile of the cohort: cohort/tiles.parquet, cohort/clusters.parquet, concepts."""
    _setup_logging(verbose)
    from rich.console import Console
    from rich.table import Table

    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.core.config import ClusterConfig
    from wsi_explain.core.errors import WsiExplainError

    cfg = _config(ClusterConfig, "clustering", method=method, k=k, min_cluster_size=min_cluster_size, pca=pca, l2=l2,
                  n_neighbors=n_neighbors, concepts=concepts, seed=seed,
                  positive_labels=tuple(p.strip() for p in positive_labels.split(",")) if positive_labels else ())
    rf = _open_run(run)
    console = Console()
    with rf, console.status("clustering") as st:
        try:
            out = run_cluster_stage(rf, cfg, on_step=lambda name: st.update(f"clustering: {name}"))
        except WsiExplainError as exc:
            _fail(str(exc))
    if out.status == "skipped":
        console.print("clustering already done with the same inputs and parameters (skipped)")
    import pandas as pd

    summary = pd.read_parquet(rf.path / "cohort" / "clusters.parquet")
    table = Table(title=f"{out.n_tiles} tiles, {out.n_clusters} clusters, {out.n_noise} noise, {out.flagged} flagged")
    for col in ("cluster", "size", "slides", "positive rate", "confidence", "flags"):
        table.add_column(col, overflow="fold")
    for _, r in summary.iterrows():
        table.add_row(str(r["cluster"]), str(r["size"]), str(r["n_slides"]), f"{r['positive_rate']:.2f}",
                      f"{r['mean_confidence']:.2f}", "; ".join(r["flag_reasons"]))
    console.print(table)
    if out.timings:
        console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in out.timings.items()))


def _csv(value: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@app.command()
def score(
    run: Path = typer.Argument(..., help="Run folder (clustered)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods to score (default: those extracted)."),
    per_cluster: int = typer.Option(64, help="Tiles sampled per cluster for the expensive metrics."),
    models: Optional[list[Path]] = typer.Option(None, "--models", help="Extra checkpoints (same architecture) for the ensemble spread; repeat the option."),
    groups: Optional[str] = typer.Option(None, help="Comma-separated metric families (default: all): faithfulness, robustness, localisation, complexity, ensemble, sanity, removal."),
    steps: int = typer.Option(16, help="Deletion/insertion steps."),
    baselines: str = typer.Option("blur,constant", help="Deletion/insertion baselines."),
    road_percentiles: str = typer.Option("20,40,60,80", help="ROAD percentiles."),
    road_tiles: int = typer.Option(0, help="ROAD on the first N tiles of each sample (0 = all; about 0.3 s per tile and percentile at 224 px)."),
    sanity_tiles: int = typer.Option(8, help="Tiles per cluster for the randomisation test (0 = none)."),
    batch_size: int = typer.Option(32),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score every cluster per attribution method: cohort/cluster_metrics.parquet and friends."""
    _setup_logging(verbose)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from wsi_explain.core.config import METRIC_GROUPS, ScoreConfig
    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.explain.card import ModelError
    from wsi_explain.stages.score import COHORT_ROW, run_score_stage

    try:
        pct = tuple(int(p) for p in _csv(road_percentiles))
    except ValueError:
        _fail(f"--road-percentiles must be integers, got {road_percentiles!r}")
    cfg = _config(ScoreConfig, "score", methods=_csv(methods), per_cluster=per_cluster,
                  models=tuple(str(m) for m in models or ()), groups=_csv(groups) or METRIC_GROUPS, steps=steps,
                  baselines=_csv(baselines), road_percentiles=pct, road_tiles=road_tiles, sanity_tiles=sanity_tiles, batch_size=batch_size,
                  device=device, seed=seed)
    console = Console()
    rf = _open_run(run)
    with rf, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
        tasks: dict[str, int] = {}

        def on_progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        try:
            out = run_score_stage(rf, cfg, on_progress=on_progress)
        except (WsiExplainError, ModelError) as exc:
            _fail(str(exc))
    if out.status == "skipped":
        console.print("scoring already done with the same inputs and parameters (skipped)")
    import pandas as pd

    cm = pd.read_parquet(rf.path / "cohort" / "cluster_metrics.parquet")
    cohort = cm[(cm.cluster == COHORT_ROW)]
    table = Table(title=f"cohort-level metrics ({out.n_sampled} sampled tiles; per-cluster rows in cohort/cluster_metrics.parquet)")
    for col in ("method", "metric", "value", "95% CI", "tiles"):
        table.add_column(col)
    for _, r in cohort.iterrows():
        table.add_row(r["method"], r["metric"], f"{r['value']:.3g}", f"[{r['ci_low']:.3g}, {r['ci_high']:.3g}]", str(r["n_tiles"]))
    console.print(table)
    for m, v in out.sanity.items():
        verdict = "passes" if v["passed"] else "FAILS"
        console.print(f"randomisation sanity check: {m} {verdict} (Spearman {v['spearman']:.2f}, SSIM {v['ssim']:.2f} after full randomisation)")


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run folder (clustered; scored runs also show metrics)."),
    max_points: int = typer.Option(200_000, help="Most tiles drawn in the report's UMAP (a stratified sample beyond)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Write report/index.html (cohort), report/clusters/*.html and report/slides/*.html."""
    _setup_logging(verbose)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.stages.report import run_report_stage

    console = Console()
    rf = _open_run(run)
    with rf, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("report pages", total=None)
        try:
            out = run_report_stage(rf, max_points=max_points, on_progress=lambda w, d, t: bar.update(task, completed=d, total=t))
        except WsiExplainError as exc:
            _fail(str(exc))
    console.print(f"report: {out.index} ({out.n_pages} pages, {out.n_images} tile images, {out.seconds:.1f} s)")


@app.command()
def serve(
    run: Path = typer.Argument(..., help="Run folder (clustered)."),
    port: int = typer.Option(5006, help="Port."),
    address: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    allow_origin: Optional[list[str]] = typer.Option(None, help="Extra host:port allowed to open the websocket (when proxied)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the linked explorer (UMAP, slide panel, gallery, cluster table, naming) until Ctrl-C."""
    _setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.report.serve import make_server

    try:
        server = make_server(run, port=port, address=address, allow_origin=allow_origin)
    except WsiExplainError as exc:
        _fail(str(exc))
    if address not in ("127.0.0.1", "localhost", "::1"):
        Console(stderr=True).print(f"warning: serving on {address}: anyone who can reach this machine can open the run")
    server.start()
    Console().print(f"explorer: http://{'127.0.0.1' if address in ('0.0.0.0', '') else address}:{port}/explorer (Ctrl-C stops)")
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass


@app.command()
def export(run: Path = typer.Argument(..., help="Run folder (clustered).")) -> None:
    """Write exports/<slide>.geojson (tiles as QuPath detections, classified by cluster) and
    exports/cohort_tiles.csv."""
    from rich.console import Console

    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.report.export import export_run

    with _open_run(run) as rf:
        try:
            paths = export_run(rf)
        except WsiExplainError as exc:
            _fail(str(exc))
    Console().print(f"wrote {len(paths) - 1} GeoJSON file(s) and {paths[-1]}")


@app.command()
def status(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Print each stage and slide of a run with its state, counts and errors."""
    from rich.console import Console
    from rich.table import Table

    from wsi_explain.core.errors import ManifestError
    from wsi_explain.core.run import RunFolder

    try:
        rf = RunFolder(run, readonly=True)
    except ManifestError as exc:
        _fail(str(exc))
    console = Console()
    if not rf.manifest["stages"]:
        console.print(f"{rf.path}: no stage has run yet")
        return
    for name, stage in rf.manifest["stages"].items():
        table = Table(title=f"stage: {name}")
        for col in ("slide", "status", "tiles", "seconds", "error"):
            table.add_column(col, overflow="fold")
        for sid, rec in stage.get("slides", {}).items():
            table.add_row(sid, rec.get("status", "?"), str(rec.get("n_tiles", "")), str(rec.get("seconds", "")), rec.get("error") or "")
        console.print(table)


@app.command("run")
def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML run config (see README); options below override it."),
    slides: Optional[list[str]] = typer.Option(None, "--slides", help="Slide files, folders or cohort CSVs (repeat)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Architecture: torchvision name, efficientnet_lite0, torchscript or package.module:factory."),
    weights: Optional[str] = typer.Option(None, help="Checkpoint (weights_only) or TorchScript file."),
    num_classes: Optional[int] = typer.Option(None, help="Classes of the model (or from its model card)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated attribution methods."),
    tile_px: Optional[int] = typer.Option(None, help="Tile size in pixels."),
    mpp_target: Optional[float] = typer.Option(None, help="Tile resolution, µm per pixel."),
    mpp: Optional[float] = typer.Option(None, help="Level-0 µm/px for files that lack it."),
    positive_labels: Optional[str] = typer.Option(None, help="Comma-separated annotation classes that are positive."),
    per_cluster: Optional[int] = typer.Option(None, help="Tiles sampled per cluster for the expensive metrics."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages (default: tile,extract,cluster,score,report)."),
    workers: Optional[int] = typer.Option(None, help="Dask LocalCluster worker processes for tiling and extraction (1 = serial)."),
    scheduler: Optional[str] = typer.Option(None, help="Existing Dask scheduler, tcp://host:port."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The whole audit: tile, extract, cluster, score and report, skipping what is already done."""
    _setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.core.errors import WsiExplainError
    from wsi_explain.explain.card import ModelError
    from wsi_explain.stages.pipeline import PipelineConfig, read_pipeline_yaml, run_pipeline

    def section(base: dict, **kw) -> dict:
        return {**base, **{k: v for k, v in kw.items() if v is not None}}

    try:
        doc = read_pipeline_yaml(config) if config else {}
    except WsiExplainError as exc:
        _fail(str(exc))
    doc = section(doc, slides=list(slides) if slides else None, out=str(out) if out else None, workers=workers,
                  scheduler=scheduler, mpp=mpp, stages=list(_csv(stages)) or None)
    doc["tile"] = section(doc.get("tile") or {}, tile_px=tile_px, mpp_target=mpp_target)
    doc["extract"] = section(doc.get("extract") or {}, arch=model, weights=weights, num_classes=num_classes,
                             methods=list(_csv(methods)) or None)
    doc["cluster"] = section(doc.get("cluster") or {}, positive_labels=list(_csv(positive_labels)) or None)
    doc["score"] = section(doc.get("score") or {}, per_cluster=per_cluster)
    if not doc.get("slides") or not doc.get("out"):
        _fail("give --slides and --out (or a run config with slides: and out:)")
    cfg = _config(PipelineConfig, "run", **doc)
    console = Console()
    with console.status("running") as st:
        def on_event(stage: str, msg: str) -> None:
            st.update(f"{stage}: {msg}")
            if msg.startswith(("finished", "started")) or ": failed" in msg:
                console.print(f"[bold]{stage}[/]: {msg}", highlight=False)

        try:
            res = run_pipeline(cfg, on_event=on_event)
        except (WsiExplainError, ModelError) as exc:
            _fail(str(exc))
    for sid, err in res.failed_slides.items():
        console.print(f"[red]failed[/] {sid}: {err}", highlight=False)
    if res.report:
        console.print(f"report: {res.report}")
    console.print(f"run folder: {res.run.resolve()}  (wsi-explain status {res.run})")
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
    _setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.demo.audit import DEMO_TILE_MPP, print_demo_summary, run_demo_audit
    from wsi_explain.demo.data import build_demo_cohort, find_demo_source

    console = Console()
    src = find_demo_source()
    console.print(f"demo source: {src or 'synthetic H&E-like texture (CMU-1-Small-Region.svs not found)'}")
    slides_dir = Path(out) / "demo_slides"
    with console.status("building demo slides"):
        build_demo_cohort(slides_dir, n_slides=n_slides, seed=seed)
    failed = _run_tiling([str(slides_dir / "cohort.csv")], out, None, _tile_config(mpp_target=DEMO_TILE_MPP))
    with _open_run(out) as run:
        res = run_demo_audit(run, Path(out), workers=workers, per_cluster=per_cluster, seed=seed,
                             status=lambda msg: console.status(msg))
    print_demo_summary(Path(out), res, console)
    raise typer.Exit(1 if failed or res.failed_slides else 0)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
