"""``wsi-explain mil RUN``: a slide-level MIL head over the stored tile embeddings, which tiles its
decisions rest on, and what happens to them when the bags change.

Per slide (its bag: the embeddings of its extracted tiles, from ``features.zarr``, no
re-extraction), written to a ``mil/`` group of the slide's feature store, one value per tile (NaN
for tiles that failed to decode): ``attention_raw`` and ``attention`` (softmaxed) when the head has
attention, ``grad_x_input``, ``integrated_gradients`` and ``leave_one_out`` (NaN outside the seeded
sample) of the target class's logit (:mod:`wsi_explain.explain.mil_relevance`).

Cohort tables in ``RUN/cohort/``:

- ``mil_slides.parquet``: per slide its probability of the target class, the IG completeness gap and
  each relevance kind's Spearman with leave-one-out (faithfulness, over the sampled tiles);
- ``mil_clusters.parquet``: per cluster the mean relative attention (``N * softmax``: 1 = uniform),
  mean gradient x input and IG, and the cluster-removal effect through the head;
- ``mil_counterfactuals.parquet``: bags changed and re-scored: each cluster's tiles removed from
  every bag (an emptied bag is reported, not scored), the top ``topk_share`` most relevant tiles
  removed, and ``add_tiles`` tiles of a cluster from other slides added to each negative bag;
  with slide labels, the cohort AUC before and after in ``cohort/mil.json``.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from wsi_explain.core.atomic import atomic_write_json, atomic_write_parquet
from wsi_explain.core.config import MilConfig
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import RunFolder, now_iso, params_hash

__all__ = ["run_mil_stage", "STAGE"]

logger = logging.getLogger(__name__)

STAGE = "mil"
KINDS = ("attention", "grad_x_input", "integrated_gradients")


def _bags(run: RunFolder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """slide_id -> ((n, D) float32 embeddings, (n,) bool ok) of every extracted slide."""
    import zarr

    out = {}
    for sid, rec in sorted(run.stage("extract")["slides"].items()):
        if rec.get("status") != "done":
            continue
        g = zarr.open_group(str(run.slide_dir(sid) / "features.zarr"), mode="r")
        out[sid] = (np.asarray(g["embeddings"][:], np.float32), np.asarray(g["status"][:]) == 1)
    if not out:
        raise WsiExplainError(f"{run.path}: no extracted slide; run `wsi-explain extract` first")
    return out


def _prob(model, bag: np.ndarray, target: int) -> float:
    import torch

    if len(bag) == 0:
        return float("nan")
    with torch.no_grad():
        return float(torch.softmax(model(torch.from_numpy(np.ascontiguousarray(bag))), 0)[target])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman of the finite pairs (NaN with fewer than 3, or a constant side)."""
    from wsi_explain.metrics.sanity import spearman_rows

    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearman_rows(a[ok][None], b[ok][None])[0]) if ok.sum() >= 3 else float("nan")


def _slide(run: RunFolder, sid: str, model, emb: np.ndarray, ok: np.ndarray, cfg: MilConfig) -> tuple[dict, dict]:
    """Relevance of one slide's tiles, written to its store's ``mil/`` group: (its row of
    mil_slides, kind -> (n,) values per tile)."""
    import zarr

    from wsi_explain.explain import mil_relevance as R

    bag = emb[ok]
    full = {k: np.full(len(emb), np.nan, np.float32) for k in ("attention_raw", *KINDS, "leave_one_out")}
    att = R.attention_relevance(model, bag)
    if att is not None:
        full["attention_raw"][ok], full["attention"][ok] = att
    full["grad_x_input"][ok] = R.gradient_x_input(model, bag, target=cfg.target)
    ig, gap = R.integrated_gradients(model, bag, target=cfg.target, baseline=cfg.baseline, steps=cfg.ig_steps)
    full["integrated_gradients"][ok] = ig
    rows, drops = R.leave_one_out(model, bag, target=cfg.target, sample=cfg.loo_sample, seed=cfg.seed)
    full["leave_one_out"][np.flatnonzero(ok)[rows]] = drops
    g = zarr.open_group(str(run.slide_dir(sid) / "features.zarr"), mode="a")
    grp = g.require_group("mil")
    for k, v in full.items():
        grp.create_array(k, data=v, overwrite=True)
    grp.attrs.update({"head": cfg.head, "target": cfg.target, "baseline": cfg.baseline, "ig_gap": gap})
    row = {"slide_id": sid, "n_tiles": int(ok.sum()), "prob": _prob(model, bag, cfg.target), "ig_gap": gap}
    loo = full["leave_one_out"]
    for k in KINDS:
        row[f"spearman_{k}"] = _spearman(full[k], loo)
    row["note"] = "" if len(bag) > 1 else "a bag of one tile: no leave-one-out"
    return row, full


def _counterfactuals(model, bags: dict, rel: dict, tiles: pd.DataFrame, cfg: MilConfig) -> pd.DataFrame:
    """Bags changed and re-scored (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    rows = []
    labels = pd.to_numeric(tiles.groupby("slide_id")["label"].first(), errors="coerce") if "label" in tiles else {}
    clusters = sorted(int(c) for c in tiles["cluster"].unique() if c >= 0)
    by_slide = {sid: g.set_index("tile_id")["cluster"] for sid, g in tiles.groupby("slide_id")}
    cl_of = {  # cluster per row of each store (-2: not clustered)
        sid: by_slide.get(sid, pd.Series(dtype=int)).reindex(np.arange(len(e))).fillna(-2).to_numpy(int)
        for sid, (e, _) in bags.items()
    }
    for sid, (emb, ok) in bags.items():
        cl, before = cl_of[sid], _prob(model, emb[ok], cfg.target)
        for c in clusters:
            if (cl[ok] == c).any():
                keep = ok & (cl != c)
                note = "" if keep.any() else "the bag is empty without this cluster"
                rows.append(("remove_cluster", c, sid, before, _prob(model, emb[keep], cfg.target), note))
        ig = rel[sid]["integrated_gradients"]
        top = np.argsort(-np.where(ok, ig, -np.inf))[: max(1, int(round(cfg.topk_share * ok.sum())))]
        keep = ok.copy()
        keep[top] = False
        rows.append(("remove_top_relevant", -1, sid, before, _prob(model, emb[keep], cfg.target), ""))
        if labels.get(sid, np.nan) != 0:
            continue
        for c in clusters:  # a cluster's tiles from the other slides, added to this negative bag
            pool = [e[o & (cl_of[s] == c)] for s, (e, o) in bags.items() if s != sid]
            pool = np.concatenate(pool) if pool else np.zeros((0, emb.shape[1]), np.float32)
            if len(pool):
                add = pool[rng.choice(len(pool), min(cfg.add_tiles, len(pool)), replace=False)]
                after = _prob(model, np.concatenate([emb[ok], add]), cfg.target)
                rows.append(("add_cluster_to_negative", c, sid, before, after, f"{len(add)} tiles added"))
    out = pd.DataFrame(rows, columns=["kind", "cluster", "slide_id", "prob_before", "prob_after", "note"])
    out["d_prob"] = out["prob_after"] - out["prob_before"]
    return out


def _cluster_table(tiles: pd.DataFrame, rel: dict, cf: pd.DataFrame) -> pd.DataFrame:
    parts = []
    for sid, r in rel.items():
        t = tiles[tiles["slide_id"] == sid][["tile_id", "cluster"]].copy()
        n = np.isfinite(r["integrated_gradients"]).sum()
        for k in KINDS:
            v = r[k][t["tile_id"].to_numpy()]
            t[k] = v * n if k == "attention" else v  # attention relative to uniform (1 = average)
        parts.append(t)
    df = pd.concat(parts)
    table = df.groupby("cluster")[list(KINDS)].mean().add_prefix("mean_").reset_index()
    rem = cf[cf["kind"] == "remove_cluster"].groupby("cluster")["d_prob"].agg(lambda s: s.abs().max())
    return table.merge(rem.rename("max_abs_d_prob_removed").reset_index(), on="cluster", how="left")


def _fingerprint(run: RunFolder, cfg: MilConfig) -> str:
    """The inputs: the extraction and clustering records and the head's weights file."""
    import hashlib
    from pathlib import Path

    ext = run.stage("extract")["slides"]
    clu = run.slide_record("cluster", "cohort") or {}
    w = Path(cfg.weights) if cfg.weights else None
    wsig = [str(w), w.stat().st_size, w.stat().st_mtime_ns] if w is not None and w.is_file() else None
    blob = json.dumps(
        [[s, r.get("fingerprint"), r.get("end")] for s, r in sorted(ext.items())] + [clu.get("end"), wsig]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def run_mil_stage(run: RunFolder, cfg: MilConfig) -> dict:
    """Load the head, compute every slide's tile relevance and the counterfactual bags, write the
    tables (see the module docstring); returns the cohort summary (``cohort/mil.json``)."""
    from wsi_explain.explain.mil import load_mil_head
    from wsi_explain.metrics.removal import _auc, slide_labels

    t0, start = time.perf_counter(), now_iso()
    src = run.path / "cohort" / "tiles.parquet"
    if not src.exists():
        raise WsiExplainError(f"{run.path}: not clustered; run `wsi-explain cluster` first")
    params = params_hash(cfg.model_dump(mode="json"))
    fp = _fingerprint(run, cfg)
    if run.is_done(STAGE, "cohort", params=params, fingerprint=fp):  # a rerun is a no-op
        return json.loads((run.path / "cohort" / "mil.json").read_text())
    bags = _bags(run)
    dim = next(iter(bags.values()))[0].shape[1]
    model = load_mil_head(
        cfg.head, in_dim=dim, n_classes=cfg.n_classes, weights=cfg.weights, trust=cfg.trust_checkpoint
    )
    if not 0 <= cfg.target < cfg.n_classes:
        raise WsiExplainError(f"target class {cfg.target} out of range for {cfg.n_classes} classes")
    tiles = pd.read_parquet(src)
    slides, rel = [], {}
    for sid, (emb, ok) in bags.items():
        row, rel[sid] = _slide(run, sid, model, emb, ok, cfg)
        slides.append(row)
    slides = pd.DataFrame(slides)
    cf = _counterfactuals(model, bags, rel, tiles, cfg)
    cdir = run.path / "cohort"
    atomic_write_parquet(slides, cdir / "mil_slides.parquet")
    atomic_write_parquet(cf, cdir / "mil_counterfactuals.parquet")
    atomic_write_parquet(_cluster_table(tiles, rel, cf), cdir / "mil_clusters.parquet")
    summary = {"head": cfg.head, "target": cfg.target, "n_slides": len(slides), "started": start}
    labels = slide_labels(tiles)
    if labels is not None:
        before = slides.set_index("slide_id")["prob"]
        summary["auc_before"] = _auc(labels.reindex(before.index), before)
        for c, g in cf[cf["kind"] == "remove_cluster"].groupby("cluster"):
            after = before.copy()
            after[g["slide_id"].to_numpy()] = g["prob_after"].to_numpy()
            summary.setdefault("auc_without_cluster", {})[str(int(c))] = _auc(labels.reindex(after.index), after)
    summary["faithfulness"] = {k: float(slides[f"spearman_{k}"].mean()) for k in KINDS}
    atomic_write_json(cdir / "mil.json", json.loads(json.dumps(summary, default=float)))
    outputs = [f"cohort/{f}" for f in ("mil_slides.parquet", "mil_clusters.parquet", "mil_counterfactuals.parquet")]
    run.record(
        STAGE,
        "cohort",
        status="done",
        params=params,
        fingerprint=fp,
        outputs=outputs + ["cohort/mil.json"],
        seconds=round(time.perf_counter() - t0, 3),
        end=now_iso(),
    )
    return summary
