"""``wsi-explain mil RUN``: a slide-level MIL head over the stored tile embeddings, which tiles its
decisions rest on, and what happens to them when the bags change.

Per slide (its bag: the embeddings of its extracted tiles, from ``features.zarr``, no
re-extraction), written to a ``mil/`` group of the slide's feature store, one value per tile (NaN
for tiles that failed to decode): ``attention_raw`` and ``attention`` (softmaxed) when the head has
attention, ``grad_x_input``, ``integrated_gradients`` and ``leave_one_out`` (NaN outside the seeded
sample) of the target class's logit (:mod:`wsi_explain.explain.mil_relevance`).

Cohort tables in ``RUN/cohort/``:

- ``mil_slides.parquet``: per slide its probability of the target class, its predicted class, the IG
  completeness gap and each relevance kind's Spearman with leave-one-out (faithfulness, over the
  sampled tiles);
- ``mil_tiles.parquet``: per clustered tile its relative attention, gradient x input, IG and
  leave-one-out (what the explorer colours by);
- ``mil_clusters.parquet``: per cluster the mean relative attention (``N * softmax``: 1 = uniform),
  mean gradient x input and IG, and the cluster-removal effect through the head;
- ``mil_counterfactuals.parquet``: bags changed and re-scored: each cluster's tiles removed from
  every bag (an emptied bag is reported, not scored), the top ``topk_share`` most relevant tiles
  removed, and ``add_tiles`` tiles of a cluster from other slides added to each negative bag;
  with slide labels, the cohort AUC before and after each cluster's removal in ``cohort/mil.json``;
  with ISUP grades (an ``isup`` or ``isup_grade`` column of the cohort CSV) and a head with more
  than 2 classes, enough for every grade (class index = grade), the quadratic-weighted kappa of its
  predicted class against them, before and after.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from wsi_explain.core.atomic import atomic_write_json, atomic_write_parquet
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import RunFolder, now_iso, params_hash
from wsi_explain.core.stage_configs import MilConfig

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


def _score(model, bag: np.ndarray, target: int) -> tuple[float, int]:
    """(probability of ``target``, predicted class) of a bag; (NaN, -1) for an empty bag."""
    import torch

    if len(bag) == 0:
        return float("nan"), -1
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(bag))), 0)
    return float(p[target]), int(p.argmax())


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
    prob, pred = _score(model, bag, cfg.target)
    row = {"slide_id": sid, "n_tiles": int(ok.sum()), "prob": prob, "pred": pred, "ig_gap": gap}
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
        cl, before = cl_of[sid], _score(model, emb[ok], cfg.target)[0]
        for c in clusters:
            if (cl[ok] == c).any():
                keep = ok & (cl != c)
                note = "" if keep.any() else "the bag is empty without this cluster"
                after, pred = _score(model, emb[keep], cfg.target)
                rows.append(("remove_cluster", c, sid, before, after, note, pred))
        ig = rel[sid]["integrated_gradients"]
        top = np.argsort(-np.where(ok, ig, -np.inf))[: max(1, int(round(cfg.topk_share * ok.sum())))]
        keep = ok.copy()
        keep[top] = False
        rows.append(("remove_top_relevant", -1, sid, before, *_score(model, emb[keep], cfg.target)[:1], "", -1))
        if labels.get(sid, np.nan) != 0:
            continue
        for c in clusters:  # a cluster's tiles from the other slides, added to this negative bag
            pool = [e[o & (cl_of[s] == c)] for s, (e, o) in bags.items() if s != sid]
            pool = np.concatenate(pool) if pool else np.zeros((0, emb.shape[1]), np.float32)
            if len(pool):
                add = pool[rng.choice(len(pool), min(cfg.add_tiles, len(pool)), replace=False)]
                after = _score(model, np.concatenate([emb[ok], add]), cfg.target)[0]
                rows.append(("add_cluster_to_negative", c, sid, before, after, f"{len(add)} tiles added", -1))
    cols = ["kind", "cluster", "slide_id", "prob_before", "prob_after", "note", "pred_after"]
    out = pd.DataFrame(rows, columns=cols)
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


def _tile_table(tiles: pd.DataFrame, rel: dict) -> pd.DataFrame:
    """Per clustered tile: attention relative to uniform (``N * softmax``, 1 = average), gradient x
    input, Integrated Gradients and leave-one-out (NaN where not computed), for the explorer."""
    parts = []
    for sid, r in rel.items():
        t = tiles.loc[tiles["slide_id"] == sid, ["slide_id", "tile_id"]].copy()
        ids = t["tile_id"].to_numpy()
        n = np.isfinite(r["integrated_gradients"]).sum()
        t["mil_attention"] = r["attention"][ids] * n
        t["mil_grad_x_input"] = r["grad_x_input"][ids]
        t["mil_ig"] = r["integrated_gradients"][ids]
        t["mil_leave_one_out"] = r["leave_one_out"][ids]
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def _grades(tiles: pd.DataFrame) -> pd.Series | None:
    """Per-slide ISUP grade (an ``isup`` or ``isup_grade`` column of the cohort), or None."""
    col = next((c for c in ("isup", "isup_grade") if c in tiles.columns), None)
    if col is None:
        return None
    g = pd.to_numeric(tiles.groupby("slide_id")[col].first(), errors="coerce").dropna()
    return g.astype(int) if len(g) >= 2 else None


def _qwk(grades: pd.Series, pred: pd.Series) -> float:
    """Quadratic-weighted kappa of ISUP grades and predicted classes on the slides with both."""
    from sklearn.metrics import cohen_kappa_score

    both = pd.concat([grades, pred], axis=1, join="inner").dropna()
    both = both[both.iloc[:, 1] >= 0]
    if len(both) < 2 or both.iloc[:, 0].nunique() < 2:
        return float("nan")
    return float(cohen_kappa_score(both.iloc[:, 0].astype(int), both.iloc[:, 1].astype(int), weights="quadratic"))


def _summary(slides: pd.DataFrame, cf: pd.DataFrame, tiles: pd.DataFrame, cfg: MilConfig) -> dict:
    """Cohort AUC (slide labels) and QWK (ISUP grades) of the head, before and without each cluster."""
    from wsi_explain.metrics.removal import _auc, slide_labels

    summary = {"head": cfg.head, "target": cfg.target, "n_slides": len(slides)}
    removed = cf[cf["kind"] == "remove_cluster"]
    labels = slide_labels(tiles)
    if labels is not None:
        before = slides.set_index("slide_id")["prob"]
        summary["auc_before"] = _auc(labels.reindex(before.index), before)
        for c, g in removed.groupby("cluster"):
            after = before.copy()
            after[g["slide_id"].to_numpy()] = g["prob_after"].to_numpy()
            summary.setdefault("auc_without_cluster", {})[str(int(c))] = _auc(labels.reindex(after.index), after)
    grades = _grades(tiles)
    if grades is not None and cfg.n_classes > 2 and cfg.n_classes > int(grades.max()):  # classes = grades
        pred = slides.set_index("slide_id")["pred"]
        summary["qwk_before"] = _qwk(grades, pred)
        for c, g in removed.groupby("cluster"):
            after = pred.copy()
            after[g["slide_id"].to_numpy()] = g["pred_after"].to_numpy()
            summary.setdefault("qwk_without_cluster", {})[str(int(c))] = _qwk(grades, after)
    summary["faithfulness"] = {k: float(slides[f"spearman_{k}"].mean()) for k in KINDS}
    return summary


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

    t0, start = time.perf_counter(), now_iso()
    src = run.path / "cohort" / "tiles.parquet"
    if not src.exists():
        raise WsiExplainError(f"{run.path}: not clustered; run `wsi-explain cluster` first")
    params = params_hash(cfg.model_dump(mode="json"))
    fp = _fingerprint(run, cfg)
    done = run.is_done(STAGE, "cohort", params=params, fingerprint=fp)
    if done and all((run.path / "cohort" / f"mil_{f}.parquet").exists() for f in ("slides", "tiles")):  # no-op
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
    atomic_write_parquet(_tile_table(tiles, rel), cdir / "mil_tiles.parquet")
    summary = {**_summary(slides, cf, tiles, cfg), "started": start}
    atomic_write_json(cdir / "mil.json", json.loads(json.dumps(summary, default=float)))
    outputs = [f"cohort/mil_{f}.parquet" for f in ("slides", "clusters", "counterfactuals", "tiles")]
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
