"""The cohort clustering stage: every slide's features -> ``cohort/tiles.parquet``,
``cohort/clusters.parquet`` and (with concepts) ``cohort/concepts.zarr``.

Embeddings are read from each slide's Zarr store in chunks (tile images are never loaded); only
tiles with status ok are clustered. The stage is one unit in the manifest (slide id ``cohort``),
skipped when its params and the extraction records of its slides are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import clustering
from wsi_explain.core.atomic import atomic_path, atomic_write_parquet
from wsi_explain.core.config import ClusterConfig
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import STAGES, RunFolder, now_iso, params_hash
from wsi_explain.explain.maps import softmax
from wsi_explain.io.tile_table import tissue_cells

__all__ = ["ClusterOutcome", "run_cluster_stage", "load_cohort", "STAGE"]

logger = logging.getLogger(__name__)

STAGE = STAGES[2]  # "cluster"
COHORT = "cohort"


@dataclass
class ClusterOutcome:
    status: str  # done | skipped
    n_tiles: int = 0
    n_clusters: int = 0
    n_noise: int = 0
    flagged: int = 0
    seconds: float = 0.0
    timings: dict | None = None


def _label_pos(df: pd.DataFrame, meta: dict, cfg: ClusterConfig) -> np.ndarray:
    """1 / 0 / NaN per tile: positive label from annotation fractions, else from the slide label."""
    n = len(df)
    cols = [c for c in df.columns if c.startswith("label_")]
    if cols and cfg.positive_labels:
        from tiling import label_column

        pos_cols = [label_column(p) for p in cfg.positive_labels if label_column(p) in df.columns]
        neg_cols = [c for c in cols if c not in pos_cols]
        pos = df[pos_cols].sum(axis=1).to_numpy() if pos_cols else np.zeros(n)
        neg = df[neg_cols].sum(axis=1).to_numpy() if neg_cols else np.zeros(n)
        return np.where(pos >= 0.5, 1.0, np.where(neg >= 0.5, 0.0, np.nan))
    label = (meta.get("meta") or {}).get("label")
    try:
        return np.full(n, float(float(label) > 0))
    except (TypeError, ValueError):
        return np.full(n, np.nan)


def _cam_shares(df: pd.DataFrame, cam: np.ndarray, tissue_png: Path, scale: float) -> None:
    """Adds ``cam_off_tissue`` (share of the CAM mass off tissue) and ``cam_on_ink`` (on pen-ink
    cells; 0 for a slide without ink, NaN for an all-zero map) to ``df`` in place."""
    cells = tissue_cells(df, tissue_png, scale, *cam.shape[1:])
    df["cam_off_tissue"] = clustering.off_tissue_fraction(cam, cells)
    ink = tissue_cells(df, tissue_png, scale, *cam.shape[1:], code=(2, 3))
    # share of the CAM mass on pen-ink cells (the "off" cells of a mask that is True off ink)
    df["cam_on_ink"] = (
        clustering.off_tissue_fraction(cam, ~ink)
        if ink.any()
        else np.where(cam.reshape(len(cam), -1).max(1) > 0, 0.0, np.nan).astype(np.float32)
    )


def _slide_frame(run: RunFolder, sid: str, cfg: ClusterConfig, cam_method: str | None, chunk: int):
    """One slide's ok tiles with predictions, slide metadata and CAM shares -> (frame, embeddings,
    raw CAMs or None, store, ok rows, tile-table metadata), or None when no tile is usable."""
    from wsi_explain.io.features import open_store, read_cams
    from wsi_explain.io.tile_table import read_tile_table

    sdir = run.slide_dir(sid)
    tiles, meta = read_tile_table(sdir / "tiles.parquet")
    g = open_store(sdir / "features.zarr")
    ok = np.flatnonzero(np.asarray(g["status"][:]) == 1)
    if len(ok) == 0:
        logger.warning("slide %s: no tile with usable features; left out of the cohort", sid)
        return None
    emb = np.concatenate([np.asarray(g["embeddings"][s : s + chunk], np.float32) for s in range(0, len(tiles), chunk)])
    probs = softmax(np.asarray(g["logits"][:], np.float32)[ok])
    df = tiles.iloc[ok].reset_index(drop=True)
    df.insert(0, "slide_id", sid)
    df["pred"] = probs.argmax(1)
    for j in range(probs.shape[1]):
        df[f"prob_{j}"] = probs[:, j]
    df["confidence"] = probs.max(1)
    pc = min(cfg.positive_class, probs.shape[1] - 1)
    df["prob_pos"] = probs[:, pc]
    df["pred"] = (df["pred"] == pc).astype(int) if probs.shape[1] == 2 else df["pred"]
    _uncertainty(df, probs, g, ok, pc)
    for k, v in (meta.get("meta") or {}).items():
        df[f"slide_{k}" if k in df.columns else k] = v
    df["label_pos"] = _label_pos(df, meta, cfg)
    cam = None
    if cam_method and f"cams/{cam_method}" in g:
        cam = read_cams(g, cam_method, ok)
        _cam_shares(df, cam, sdir / "tissue.png", float(meta["tissue_mask_scale"]))
    return df, emb[ok], cam, g, ok, meta


def _uncertainty(df: pd.DataFrame, probs: np.ndarray, g, ok: np.ndarray, pc: int) -> None:
    """Adds ``entropy`` (predictive entropy of the class probabilities over log K, in [0, 1]) and,
    with an ensemble, ``ensemble_std`` (spread of the positive probability across its models)."""
    p = np.clip(probs, 1e-12, 1.0)
    df["entropy"] = (-(p * np.log(p)).sum(1) / np.log(max(probs.shape[1], 2))).astype(np.float32)
    if "ensemble/probs_std" in g:
        df["ensemble_std"] = np.asarray(g["ensemble/probs_std"].oindex[ok], np.float32)[:, pc]


def load_cohort(run: RunFolder, slide_ids: list[str], cfg: ClusterConfig, *, chunk: int = 65_536):
    """Read the cohort: the tile table (ok tiles only), embeddings, the CAM and activations.

    Returns
    -------
    tiles : DataFrame (one row per clustered tile)
    X : (n, D) float32 embeddings
    cams : (n, h, w) float32 raw CAM of ``cfg.cam_method`` (or None)
    acts : list of (slide_id, store, row indices) for concept discovery (read lazily)
    class_names : list of str
    cam_method : the method whose CAM was read (``cfg.cam_method``, else the first extracted)
    """
    from wsi_explain.io.features import open_store

    frames, embs, cams_all, acts, annotated = [], [], [], [], []
    class_names: list[str] = []
    cam_method = cfg.cam_method
    for sid in slide_ids:
        attrs = open_store(run.slide_dir(sid) / "features.zarr").attrs
        cam_method = cam_method or (list(attrs.get("methods", [])) or [None])[0]
        got = _slide_frame(run, sid, cfg, cam_method, chunk)
        if got is None:
            continue
        df, emb, cam, g, ok, meta = got
        class_names = list(g.attrs.get("class_names", []))
        if meta.get("annotations") or meta.get("label_mask"):
            annotated.append(sid)
        if cam is not None:
            cams_all.append(cam)
        if "activations" in g:
            acts.append((sid, g, ok))
        frames.append(df)
        embs.append(emb)
    if not frames:
        raise WsiExplainError(f"{run.path}: no slide has extracted features; run `wsi-explain extract` first")
    tiles = pd.concat(frames, ignore_index=True)
    # an annotated slide without some class (an empty GeoJSON: nothing annotated) has 0 of it, not "unknown"
    label_cols = [c for c in tiles.columns if c.startswith("label_") and c != "label_pos"]
    if label_cols and annotated:
        rows = tiles["slide_id"].isin(annotated)
        tiles.loc[rows, label_cols] = tiles.loc[rows, label_cols].fillna(0.0)
    cams = np.concatenate(cams_all) if cams_all and len(cams_all) == len(frames) else None
    return tiles, np.concatenate(embs), cams, acts, class_names, cam_method


def _concepts(acts, tiles: pd.DataFrame, cams, cfg: ClusterConfig, out: Path, timings: dict) -> pd.DataFrame:
    """Fit NMF prototypes on positions sampled over the cohort; write concepts.zarr; return weights."""
    import zarr

    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    n_total = sum(len(ok) for _, _, ok in acts)
    sample = []
    for _sid, g, ok in acts:
        take = max(1, int(round(cfg.concept_positions * len(ok) / n_total)))
        rows = np.sort(rng.choice(ok, size=min(len(ok), max(1, take // 4 + 1)), replace=False))
        a = np.asarray(g["activations"].oindex[rows], np.float32)
        sample.append(clustering.sample_positions(a, take, rng))
    model = clustering.fit_concepts(np.concatenate(sample), cfg.concepts, seed=cfg.seed)
    maps = []
    for _sid, g, ok in acts:
        for s in range(0, len(ok), 4096):
            a = np.asarray(g["activations"].oindex[ok[s : s + 4096]], np.float32)
            maps.append(clustering.concept_maps(a, model))
    maps = np.concatenate(maps)
    weights = maps.mean((2, 3))
    assoc = clustering.concept_prediction_association(weights, tiles["pred"].to_numpy(), seed=cfg.seed)
    corr = (
        clustering.concept_cam_correlation(maps, cams)
        if cams is not None and cams.shape[1:] == maps.shape[2:]
        else np.full(cfg.concepts, np.nan)
    )
    top = {str(k): np.argsort(-weights[:, k], kind="stable")[:16].tolist() for k in range(cfg.concepts)}
    with atomic_path(out) as tmp:
        z = zarr.open_group(str(tmp), mode="w")
        z.create_array("components", data=model.components)
        z.create_array("weights", data=weights.astype(np.float32))
        z.create_array("maps", data=maps.astype(np.float16), chunks=(min(len(maps), 4096),) + maps.shape[1:])
        z.attrs.update(
            {
                "reconstruction_error": model.reconstruction_error,
                "n_positions": model.n_positions,
                "nmf_iterations": model.n_iter,
                "nmf_converged": model.converged,
                "auc": [None if np.isnan(v) else float(v) for v in assoc["auc"]],
                "coef": [None if np.isnan(v) else float(v) for v in assoc["coef"]],
                "auc_all": None if np.isnan(assoc["auc_all"]) else assoc["auc_all"],
                "cam_correlation": [None if np.isnan(v) else float(v) for v in corr],
                "top_tiles": top,
                "rows": "cohort/tiles.parquet row order",
            }
        )
    timings["concepts"] = round(time.perf_counter() - t0, 3)
    return pd.DataFrame(weights, columns=[f"concept_{k}" for k in range(cfg.concepts)])


def _fingerprint(run: RunFolder, ids: list[str]) -> str:
    recs = run.stage("extract")["slides"]
    blob = json.dumps([[s, recs[s].get("fingerprint"), recs[s].get("params"), recs[s].get("end")] for s in ids])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class _Steps:
    """Calls ``on_step(name)`` before each step and keeps its time in ``timings`` (seconds)."""

    def __init__(self, on_step: Callable[[str], None] | None) -> None:
        self.on_step = on_step or (lambda s: None)
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kw):
        self.on_step(name)
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 3)
        return out


def _embed_and_cluster(X: np.ndarray, cfg: ClusterConfig, timed: _Steps):
    """PCA, L2, the FAISS k-NN graph and UMAP (2-D, and ``cluster_dims`` for HDBSCAN), then
    HDBSCAN on the UMAP space or k-means on the reduced embeddings -> (2-D UMAP, the space clustered,
    ClusterResult, k-NN / UMAP info, the reduced embeddings)."""
    n = len(X)
    Z = timed("pca", clustering.pca_reduce, X, cfg.pca, seed=cfg.seed) if cfg.pca else X
    if cfg.l2:
        Z = clustering.l2_normalise(Z)
    dims = (2, cfg.cluster_dims) if cfg.method == "hdbscan" else (2,)
    sub: dict[str, float] = {}
    embs, info = timed(
        "knn_umap",
        clustering.umap_cohort,
        Z,
        n_components=dims,
        min_dist=(0.1, cfg.min_dist)[: len(dims)],
        n_neighbors=cfg.n_neighbors,
        fit_max=cfg.umap_fit_max,
        seed=cfg.seed,
        knn_method=cfg.knn_method,
        exact_max=cfg.exact_max,
        timings=sub,
    )
    timed.timings.update(sub)
    if cfg.method == "hdbscan":
        space = embs[cfg.cluster_dims]
        mcs = cfg.min_cluster_size or max(5, min(100, n // 50))
        res = timed(
            "cluster",
            clustering.hdbscan_cluster,
            space,
            min_cluster_size=mcs,
            min_samples=cfg.min_samples,
            fit_max=cfg.fit_max,
            seed=cfg.seed,
        )
    else:
        space = Z
        res = timed("cluster", clustering.kmeans_cluster, Z, min(cfg.k, n), seed=cfg.seed)
    return embs[2], space, res, info, Z


def _save_index(Z: np.ndarray, cohort_dir: Path, cfg: ClusterConfig) -> str:
    """The reduced embeddings' FAISS index, rows in the order of cohort/tiles.parquet (the explorer's
    "find similar")."""
    return clustering.save_index(
        Z, cohort_dir / "neighbours.faiss", method=cfg.knn_method, exact_max=cfg.exact_max, seed=cfg.seed
    )


def _with_concepts(run: RunFolder, tiles: pd.DataFrame, acts, cams, cfg: ClusterConfig, timings: dict) -> pd.DataFrame:
    """The tile table with concept weights (``--concepts``), or as it is (an old concepts.zarr is removed)."""
    out = run.path / "cohort" / "concepts.zarr"
    if not cfg.concepts:
        if out.exists():
            shutil.rmtree(out)
        return tiles
    if len(acts) != len(set(tiles["slide_id"])):
        raise WsiExplainError(
            f"{run.path}: --concepts needs spatial activations for every slide; rerun extract with --activations"
        )
    return pd.concat([tiles, _concepts(acts, tiles, cams, cfg, out, timings)], axis=1)


def _model_task(run: RunFolder, sid: str) -> dict:
    """The model's task ("classification" or "segmentation") and region target, from a slide's store."""
    from wsi_explain.io.features import open_store

    attrs = open_store(run.slide_dir(sid) / "features.zarr").attrs
    return {"task": attrs.get("task", "classification"), "region": attrs.get("region")}


def _summary(tiles: pd.DataFrame, space: np.ndarray, class_names: list[str], cfg: ClusterConfig) -> pd.DataFrame:
    """One row per cluster with its flags; the artefact flag reads how far removing the cluster
    moves some slide's top-8 score (cluster removal on the stored probabilities), the site flag a
    permutation test of the cluster's site mix over slides (200 permutations)."""
    from clustering.summary import SITE_COLUMNS
    from wsi_explain.metrics import cluster_removal
    from wsi_explain.metrics.leakage import site_composition

    name = class_names[cfg.positive_class] if len(class_names) > cfg.positive_class else "positive"
    _, removal = cluster_removal(tiles, topk=8)
    effect = dict(zip(removal["cluster"], removal["max_abs_d_topk"]))
    site_col = next((c for c in SITE_COLUMNS if c in tiles.columns), None)
    site_p = None
    if site_col is not None and tiles[site_col].nunique() > 1:
        comp = site_composition(
            tiles["cluster"].to_numpy(),
            tiles[site_col].to_numpy(),
            tiles["slide_id"].to_numpy(),
            n_perm=200,
            seed=cfg.seed,
        )
        site_p = dict(zip(comp["cluster"].astype(int), comp["p_value"]))
    return clustering.summarize_clusters(tiles, space=space, positive_name=name, removal=effect, site_p=site_p)


def run_cluster_stage(
    run: RunFolder, cfg: ClusterConfig, *, on_step: Callable[[str], None] | None = None
) -> ClusterOutcome:
    """Cluster the whole cohort of the run (every slide whose extraction is done)."""
    t_start = time.perf_counter()
    ids = sorted(s for s, r in run.stage("extract")["slides"].items() if r.get("status") == "done")
    if not ids:
        raise WsiExplainError(f"{run.path}: no extracted slide; run `wsi-explain extract` first")
    params = params_hash(cfg.model_dump(mode="json"))
    fp = _fingerprint(run, ids)
    run.set_config(STAGE, cfg.model_dump(mode="json"))
    outputs = ["cohort/tiles.parquet", "cohort/clusters.parquet", "cohort/artefact_slices.parquet"]
    outputs += ["cohort/neighbours.faiss"]
    outputs += ["cohort/concepts.zarr"] if cfg.concepts else []
    if run.is_done(STAGE, COHORT, params=params, fingerprint=fp):
        rec = run.slide_record(STAGE, COHORT)
        return ClusterOutcome(
            "skipped", rec.get("n_tiles", 0), rec.get("n_clusters", 0), rec.get("n_noise", 0), rec.get("flagged", 0)
        )
    timed, start = _Steps(on_step), now_iso()
    tiles, X, cams, acts, class_names, cam_method = timed("read", load_cohort, run, ids, cfg)
    n = len(tiles)
    if n < max(cfg.n_neighbors + 1, 10):
        need = max(cfg.n_neighbors + 1, 10)
        raise WsiExplainError(f"{run.path}: only {n} usable tiles in the cohort; clustering needs at least {need}")
    umap2, space, res, info, Z = _embed_and_cluster(X, cfg, timed)
    tiles["cluster"], tiles["membership"], tiles["outlier_score"] = res.labels, res.probabilities, res.outlier_scores
    tiles["umap_x"], tiles["umap_y"] = umap2[:, 0], umap2[:, 1]
    cohort_dir = run.path / "cohort"
    cohort_dir.mkdir(exist_ok=True)
    timed("index", _save_index, Z, cohort_dir, cfg)
    tiles, task = _with_concepts(run, tiles, acts, cams, cfg, timed.timings), _model_task(run, tiles.slide_id.iloc[0])
    summary = timed("summary", _summary, tiles, space, class_names, cfg)
    meta = {"cam_method": cam_method, "class_names": class_names, "config": cfg.model_dump(mode="json"), **task}
    atomic_write_parquet(tiles, cohort_dir / "tiles.parquet", meta)
    atomic_write_parquet(summary, cohort_dir / "clusters.parquet", {"flag_names": clustering.FLAG_NAMES})
    name = class_names[cfg.positive_class] if len(class_names) > cfg.positive_class else "positive"
    atomic_write_parquet(clustering.artefact_slices(tiles, positive_name=name), cohort_dir / "artefact_slices.parquet")
    n_clusters = int((summary["cluster"] >= 0).sum())
    flagged = int(sum(bool(f) for f in summary["flags"]))
    n_noise = int((res.labels < 0).sum())
    outcome = ClusterOutcome("done", n, n_clusters, n_noise, flagged, time.perf_counter() - t_start, timed.timings)
    run.record(
        STAGE,
        COHORT,
        status="done",
        params=params,
        fingerprint=fp,
        outputs=outputs,
        slides=ids,
        n_tiles=n,
        n_clusters=n_clusters,
        n_noise=n_noise,
        flagged=flagged,
        knn=info["knn"],
        umap_fitted=info["n_fitted"],
        hdbscan_guard=res.guard,
        timings=timed.timings,
        start=start,
        end=now_iso(),
        seconds=round(outcome.seconds, 3),
        error=None,
    )
    return outcome
