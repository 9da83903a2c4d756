"""The demo's audit after tiling: fit the head, extract, cluster, score, report; and its summary."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wsi_explain.core.run import RunFolder

__all__ = ["DemoResult", "run_demo_audit", "print_demo_summary", "DEMO_METHODS", "DEMO_TILE_MPP"]

#: the CAMs of the demo's extraction (plus Integrated Gradients on a sample of tiles)
DEMO_METHODS = ("gradcam", "gradcampp", "hirescam", "layercam", "eigencam", "integratedgradients")

#: the demo tiles 224 px at 2 µm/px (448 µm: 5x), so that 0.5-1.2 mm marker strokes cover whole tiles
DEMO_TILE_MPP = 2.0


@dataclass
class DemoResult:
    extract: list
    cluster: object
    score: object
    report: object
    failed_slides: list = field(default_factory=list)


def run_demo_audit(
    run: RunFolder,
    out: Path,
    *,
    workers: int = 2,
    per_cluster: int = 12,
    seed: int = 0,
    status: Callable[[str], contextlib.AbstractContextManager] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> DemoResult:
    """Fit the demo head on the tiled training slides, then extract, cluster, score and report.

    ``status(message)`` gives a context manager shown while a step runs (a rich status in the CLI);
    ``on_progress(what, done, total)`` is called as tiles are extracted and clusters scored.
    Light score settings keep the demo at a few minutes on 2 cores.
    """
    from wsi_explain.core.config import ClusterConfig, ExtractConfig, ScoreConfig
    from wsi_explain.demo.model import train_demo_model
    from wsi_explain.stages.cluster import run_cluster_stage
    from wsi_explain.stages.extract import run_extract_stage
    from wsi_explain.stages.report import run_report_stage
    from wsi_explain.stages.score import run_score_stage

    step = status or (lambda msg: contextlib.nullcontext())
    with step("fitting the demo head on EfficientNet-Lite0 features"):
        weights = train_demo_model(run, out / "model", seed=seed, workers=workers, mpp=DEMO_TILE_MPP)
    cfg = ExtractConfig(
        arch="efficientnet_lite0",
        weights=str(Path(weights).resolve()),  # absolute: the run can be read from any folder
        activations=True,
        workers=workers,
        seed=seed,
        attr_sample=8,
        # IG without refinement keeps the demo's time (refining these tiles to 200 steps would
        # cost ~5x); each tile's completeness error is stored beside its map and warned about
        ig_max_steps=50,
        methods=DEMO_METHODS,
    )
    progress = on_progress or (lambda what, done, total: None)
    total = sum(r.get("n_tiles", 0) for r in run.stage("tile")["slides"].values() if r.get("status") == "done")
    done = [0]

    def on_tiles(k: int) -> None:
        done[0] += k
        progress("extracting tiles", done[0], total)

    with step("extracting predictions, embeddings and CAMs"):
        ext = run_extract_stage(run, cfg, on_tiles=on_tiles)
    with step("clustering the cohort"):
        res = run_cluster_stage(run, ClusterConfig(concepts=4, seed=seed))
    scfg = ScoreConfig(
        methods=("gradcam", "hirescam"),
        per_cluster=per_cluster,
        steps=8,
        baselines=("blur",),
        road_percentiles=(50,),
        references=("random",),
        infidelity_samples=4,
        sensitivity_samples=3,
        sanity_tiles=4,
        seed=seed,
    )
    with step("scoring the clusters (faithfulness, robustness, sanity, removal)"):
        sc = run_score_stage(run, scfg, on_progress=progress)
    with step("writing the reports"):
        rep = run_report_stage(run)
    return DemoResult(ext, res, sc, rep, [r.slide_id for r in ext if r.status == "failed"])


def print_demo_summary(out: Path, res: DemoResult, console) -> None:
    """The clusters with their ink, attribution on ink and removal effect; the flagged clusters'
    effect on each slide; the sanity verdicts; where the report is."""
    cdir = out / "cohort"
    summary = pd.read_parquet(cdir / "clusters.parquet")
    metrics = pd.read_parquet(cdir / "cluster_metrics.parquet")
    ext, cl = res.extract, res.cluster
    for line in _ink_detector_lines(out):
        console.print(line, highlight=False)
    console.print(
        f"extraction: {sum(r.status != 'failed' for r in ext)} slide(s) done, {len(res.failed_slides)} failed"
    )
    console.print(f"clustering: {cl.n_tiles} tiles, {cl.n_clusters} clusters, {cl.n_noise} noise, {cl.flagged} flagged")
    model = metrics[metrics.method == "model"]
    removal = model[model.metric == "removal_max_abs_d_topk"].set_index("cluster")["value"]
    for _, r in summary.iterrows():
        flags = "; ".join(r["flag_reasons"]) or "-"
        console.print(
            f"  cluster {r['cluster']:>2}: {r['size']:>4} tiles from {r['n_slides']} slide(s), "
            f"positive rate {r['positive_rate']:.2f}, inked tiles {r['ink_tile_share']:.2f}, "
            f"CAM mass on ink {r['mean_cam_on_ink']:.2f}; without it a slide's top-8 score moves by up to "
            f"{removal.get(r['cluster'], float('nan')):.3f}; flags: {flags}",
            highlight=False,
        )
    rem = pd.read_parquet(cdir / "cluster_removal.parquet")
    flagged = [int(c) for c, f in zip(summary["cluster"], summary["flags"]) if "artefact_positive" in list(f)]
    auc = model[model.metric.isin(["removal_auc_topk_before", "removal_auc_topk_after"])]
    for c in flagged:
        for _, r in rem[rem.cluster == c].iterrows():
            console.print(
                f"  without flagged cluster {c}, slide {r['slide_id']}: top-8 score {r['topk_before']:.2f} -> "
                f"{r['topk_after']:.2f}",
                highlight=False,
            )
        a = auc[auc.cluster == c].set_index("metric")["value"]
        if len(a) == 2:
            console.print(
                f"  cohort AUC (top-8 slide scores vs slide labels) {a['removal_auc_topk_before']:.2f} -> "
                f"{a['removal_auc_topk_after']:.2f} without cluster {c}",
                highlight=False,
            )
    for m, v in res.score.sanity.items():
        console.print(
            f"randomisation sanity check: {m} {'passes' if v['passed'] else 'FAILS'} (Spearman {v['spearman']:.2f})"
        )
    console.print(f"report: {res.report.index.resolve()}")
    console.print(
        f"run folder: {out.resolve()}  (manifest: {out.resolve() / 'manifest.json'}; "
        "tables: cohort/tiles.parquet, clusters.parquet, cluster_metrics.parquet)"
    )


def _ink_detector_lines(out: Path) -> list[str]:
    """How well the tiling's ink masks found the drawn strokes, per inked demo slide."""
    import json

    from wsi_explain.demo.data import DemoSlide, ink_detection_scores
    from wsi_explain.io.tile_table import read_tile_table

    stamp = out / "demo_slides" / "demo_params.json"
    if not stamp.exists():
        return []
    lines = []
    for rec in json.loads(stamp.read_text())["slides"]:
        slide = DemoSlide(out / "demo_slides" / rec["path"], rec["label"], rec["ink"])
        sdir = out / "slides" / slide.path.stem
        if not slide.ink or not (sdir / "tissue.png").exists() or not slide.strokes_path.exists():
            continue
        _, meta = read_tile_table(sdir / "tiles.parquet")
        sc = ink_detection_scores(slide, sdir / "tissue.png", float(meta["tissue_mask_scale"]))
        lines.append(
            f"ink detector on {slide.path.stem}: recall {sc['recall']:.3f}, precision {sc['precision']:.3f} "
            "of the drawn strokes' area"
        )
    return lines
