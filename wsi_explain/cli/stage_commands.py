"""The per-stage commands: ``tile``, ``extract``, ``cluster``, ``score``."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_explain.cli.app import app
from wsi_explain.cli.console import csv as _csv
from wsi_explain.cli.console import exits_on_error, fail, make_config, open_run, progress_bar, setup_logging


def _tile_config(**kw):
    from wsi_explain.core.config import TileConfig

    return make_config(TileConfig, "tiling", **{k: v for k, v in kw.items() if v is not None})


def _run_tiling(slides: list[str], out: Path, mpp: float | None, cfg) -> int:
    from rich.console import Console

    from wsi_explain.cli.tables import print_tile_summary
    from wsi_explain.io.slides import discover_slides
    from wsi_explain.stages.tile import run_tile_stage

    with exits_on_error():
        sources = discover_slides(slides, mpp=mpp)
    run = open_run(out)
    with run, progress_bar() as progress:
        task = progress.add_task("tiling", total=len(sources))

        def on_slide(res):
            progress.update(task, advance=1, description=f"tiling {res.slide_id}")

        results = run_tile_stage(run, sources, cfg, on_slide=on_slide)
    return print_tile_summary(results, Console())


@app.command()
def tile(
    slides: list[str] = typer.Argument(..., help="Slide files, folders of slides, or a cohort CSV (column 'path')."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    mpp_target: float | None = typer.Option(0.5, help="Target µm per pixel of the tiles."),
    magnification: float | None = typer.Option(None, help="Target magnification instead of --mpp-target (10/mag µm)."),
    tile_px: int = typer.Option(224, help="Tile edge in pixels."),
    overlap: int = typer.Option(0, help="Overlap of neighbouring tiles in pixels."),
    min_tissue: float = typer.Option(0.5, help="Minimum tissue fraction of a tile."),
    mpp: float | None = typer.Option(None, help="Level-0 µm per pixel, overriding the files' own."),
    verify: str = typer.Option("sample", help="Read tiles to catch decode errors: none, sample or all."),
    label_preset: str | None = typer.Option(
        None, help="Class names of label masks: panda-radboud or panda-karolinska."
    ),
    find_ink: bool = typer.Option(
        True, help="Detect pen ink (tissue under ink stays in the grid, with its ink fraction)."
    ),
    qc: bool = typer.Option(True, help="Measure every tile: sharpness, H and E optical density, brightness."),
    drop_artefacts: bool = typer.Option(
        False, help="Leave tiles with ink fraction >= 0.05 or sharpness < 0.06 out of the grid."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Tile slides into RUN/slides/<id>/tiles.parquet (+ a thumbnail with the grid)."""
    setup_logging(verbose)
    classes = None
    if label_preset:
        import tiling

        presets = {"panda-radboud": tiling.PANDA_RADBOUD, "panda-karolinska": tiling.PANDA_KAROLINSKA}
        if label_preset not in presets:
            fail(f"unknown --label-preset {label_preset!r}; choose one of {sorted(presets)}")
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


@app.command()
def extract(
    run: Path = typer.Argument(..., help="Run folder (tiled)."),
    model: str = typer.Option(
        "resnet18",
        "--model",
        "-m",
        help="torchvision name, efficientnet_lite0, export (.pt2), torchscript, or pkg.module:factory.",
    ),
    weights: Path | None = typer.Option(None, help="Checkpoint (state dict), torch.export .pt2 or TorchScript file."),
    ensemble: list[Path] = typer.Option([], help="More checkpoints of the same architecture (repeat the option)."),
    num_classes: int | None = typer.Option(None, help="Number of classes (else from the model card)."),
    class_names: str | None = typer.Option(None, help="Comma-separated class names."),
    card: Path | None = typer.Option(None, help="Model card (YAML/JSON); default: beside the weights."),
    trust_checkpoint: bool = typer.Option(
        False, help="Allow full unpickling of a checkpoint (runs code from the file!)."
    ),
    methods: str = typer.Option(
        "gradcam,gradcampp,xgradcam,hirescam,layercam,eigencam",
        help="Comma-separated methods: fused CAMs and/or captum / grad-cam methods.",
    ),
    target: str = typer.Option("pred", help="Class the maps explain: pred, a class index or a class name."),
    target_layer: str | None = typer.Option(None, help="CAM layer (module name); default: last conv block."),
    embedding_layer: str | None = typer.Option(
        None, help="Layer whose input is the embedding; default: final classifier."
    ),
    region: str | None = typer.Option(
        None,
        help="Segmentation models: predicted (the class's predicted pixels, default), tile, or annotation "
        "(the annotated area under each tile).",
    ),
    region_labels: str | None = typer.Option(
        None, help="With --region annotation: comma-separated annotation classes (default: all)."
    ),
    activations: bool = typer.Option(False, help="Store spatial activations (for concepts)."),
    attr_sample: int = typer.Option(64, help="Tiles per slide for non-fused methods (0 = all)."),
    ig_steps: int = typer.Option(50, help="Integrated Gradients: steps of the first pass."),
    ig_max_steps: int = typer.Option(
        200, help="Integrated Gradients: tiles above --ig-tolerance are refined (steps doubled) up to this."
    ),
    ig_tolerance: float = typer.Option(0.05, help="Integrated Gradients: relative completeness error allowed."),
    batch_size: int = typer.Option(32),
    workers: int = typer.Option(2, help="Tile-reading threads or processes (0: read in the main thread)."),
    reader: str = typer.Option("auto", help="auto (threads on CPU, processes on CUDA), threads or processes."),
    decoder: str = typer.Option(
        "auto", help="auto (tiled TIFF/SVS tiles decoded directly, else OpenSlide) or openslide."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the model over every tile: predictions, embeddings and CAMs into slides/<id>/features.zarr."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.cli.tables import print_extract_summary
    from wsi_explain.core.config import ExtractConfig
    from wsi_explain.stages.extract import run_extract_stage

    cfg = make_config(
        ExtractConfig,
        "extraction",
        arch=model,
        weights=str(weights) if weights else None,
        ensemble=tuple(str(e) for e in ensemble),
        num_classes=num_classes,
        class_names=tuple(class_names.split(",")) if class_names else None,
        card=str(card) if card else None,
        trust_checkpoint=trust_checkpoint,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        target=target,
        target_layer=target_layer,
        embedding_layer=embedding_layer,
        region=region,
        region_labels=tuple(v.strip() for v in region_labels.split(",") if v.strip()) if region_labels else (),
        activations=activations,
        attr_sample=attr_sample,
        ig_steps=ig_steps,
        ig_max_steps=ig_max_steps,
        ig_tolerance=ig_tolerance,
        batch_size=batch_size,
        workers=workers,
        reader=reader,
        decoder=decoder,
        device=device,
        seed=seed,
    )
    rf = open_run(run)
    console = Console()
    with rf:
        total = sum(r.get("n_tiles", 0) for r in rf.stage("tile")["slides"].values() if r.get("status") == "done")
        with progress_bar(rate=True) as progress, exits_on_error():
            task = progress.add_task("extracting", total=total)
            results = run_extract_stage(
                rf,
                cfg,
                on_tiles=lambda k: progress.advance(task, k),
                on_slide=lambda r: progress.update(task, description=f"extracting ({r.slide_id} {r.status})"),
            )
    failed = print_extract_summary(results, console)
    raise typer.Exit(1 if failed else 0)


@app.command()
def cluster(
    run: Path = typer.Argument(..., help="Run folder (extracted)."),
    method: str = typer.Option("hdbscan", help="hdbscan or kmeans."),
    k: int = typer.Option(8, "-k", help="Clusters for k-means."),
    min_cluster_size: int | None = typer.Option(None, help="HDBSCAN min_cluster_size (default: n/50 within 5-100)."),
    pca: int = typer.Option(50, help="PCA dimensions before the k-NN (0 = none)."),
    l2: bool = typer.Option(True, "--l2/--no-l2", help="L2-normalise embeddings (after PCA)."),
    n_neighbors: int = typer.Option(15, help="UMAP neighbours (the k of the FAISS graph)."),
    concepts: int = typer.Option(0, help="NMF concept prototypes (needs extract --activations)."),
    positive_labels: str | None = typer.Option(None, help="Comma-separated annotation classes that are positive."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Cluster every tile of the cohort: cohort/tiles.parquet, cohort/clusters.parquet, concepts."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.cli.tables import print_cluster_summary
    from wsi_explain.core.config import ClusterConfig
    from wsi_explain.stages.cluster import run_cluster_stage

    cfg = make_config(
        ClusterConfig,
        "clustering",
        method=method,
        k=k,
        min_cluster_size=min_cluster_size,
        pca=pca,
        l2=l2,
        n_neighbors=n_neighbors,
        concepts=concepts,
        seed=seed,
        positive_labels=tuple(p.strip() for p in positive_labels.split(",")) if positive_labels else (),
    )
    rf = open_run(run)
    console = Console()
    with rf, console.status("clustering") as st, exits_on_error():
        out = run_cluster_stage(rf, cfg, on_step=lambda name: st.update(f"clustering: {name}"))
    print_cluster_summary(rf.path, out, console)


@app.command()
def score(
    run: Path = typer.Argument(..., help="Run folder (clustered)."),
    methods: str | None = typer.Option(None, help="Comma-separated methods to score (default: those extracted)."),
    per_cluster: int = typer.Option(64, help="Tiles sampled per cluster for the expensive metrics."),
    models: list[Path] | None = typer.Option(
        None, "--models", help="Extra checkpoints (same architecture) for the ensemble spread; repeat the option."
    ),
    groups: str | None = typer.Option(
        None,
        help="Comma-separated metric families (default: all): faithfulness, robustness, localisation, "
        "complexity, ensemble, sanity, removal, confounders.",
    ),
    steps: int = typer.Option(10, help="Deletion/insertion steps (the curve at every 10 % by default)."),
    baselines: str = typer.Option("blur,constant", help="Deletion/insertion baselines."),
    road_percentiles: str = typer.Option("20,40,60,80", help="ROAD percentiles."),
    road_tiles: int = typer.Option(
        0, help="ROAD on the first N tiles of each sample (0 = all; 1 + 2 x percentiles forwards per tile + solves)."
    ),
    references: str = typer.Option(
        "random,uniform", help="Reference maps scored beside the methods (random, uniform; empty = none)."
    ),
    nuisance: str | None = typer.Option(
        None, help="Extra cohort columns for the confounder scan (QC measures and site columns always are)."
    ),
    sanity_tiles: int = typer.Option(8, help="Tiles per cluster for the randomisation test (0 = none)."),
    batch_size: int = typer.Option(32),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score every cluster per attribution method: cohort/cluster_metrics.parquet and friends."""
    setup_logging(verbose)
    from rich.console import Console

    from wsi_explain.cli.tables import print_score_summary
    from wsi_explain.core.config import METRIC_GROUPS, ScoreConfig
    from wsi_explain.stages.score import run_score_stage

    try:
        pct = tuple(int(p) for p in _csv(road_percentiles))
    except ValueError:
        fail(f"--road-percentiles must be integers, got {road_percentiles!r}")
    cfg = make_config(
        ScoreConfig,
        "score",
        methods=_csv(methods),
        per_cluster=per_cluster,
        models=tuple(str(m) for m in models or ()),
        groups=_csv(groups) or METRIC_GROUPS,
        steps=steps,
        baselines=_csv(baselines),
        road_percentiles=pct,
        road_tiles=road_tiles,
        references=_csv(references),
        nuisance=_csv(nuisance),
        sanity_tiles=sanity_tiles,
        batch_size=batch_size,
        device=device,
        seed=seed,
    )
    console = Console()
    rf = open_run(run)
    with rf, progress_bar(console=console) as bar, exits_on_error():
        tasks: dict[str, int] = {}

        def on_progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        out = run_score_stage(rf, cfg, on_progress=on_progress)
    print_score_summary(rf.path, out, console)
