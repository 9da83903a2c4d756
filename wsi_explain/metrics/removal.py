"""Cluster removal: how much do the slide-level decisions rest on each cluster?

Slide scores are aggregated from tile probabilities (mean, and mean of the top k); each cluster
in turn is dropped from every slide and the scores recomputed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["slide_scores", "slide_labels", "cluster_removal", "group_removal"]


def slide_scores(tiles: pd.DataFrame, *, prob: str = "prob_pos", topk: int = 8) -> pd.DataFrame:
    """Per slide: ``mean`` of the tiles' positive probability and ``topk`` (mean of the k highest).

    Parameters
    ----------
    tiles : DataFrame with slide_id and ``prob`` columns (not modified).

    Returns
    -------
    DataFrame indexed by slide_id with columns mean, topk, n_tiles.
    """
    g = tiles.groupby("slide_id")[prob]
    return pd.DataFrame(
        {
            "mean": g.mean(),
            "topk": g.apply(lambda s: float(np.sort(s.to_numpy())[-topk:].mean())),
            "n_tiles": g.size(),
        }
    )


def slide_labels(tiles: pd.DataFrame) -> pd.Series | None:
    """slide_id -> 1.0 / 0.0 from a numeric slide ``label`` column (> 0 is positive; NaN where a
    slide's label is not a number); None without any numeric label."""
    if "label" not in tiles.columns:
        return None
    lab = pd.to_numeric(tiles.groupby("slide_id")["label"].first(), errors="coerce")
    return (lab > 0).astype(float).where(lab.notna()) if lab.notna().any() else None


def _auc(labels: pd.Series, scores: pd.Series) -> float:
    from sklearn.metrics import roc_auc_score

    ok = labels.notna() & scores.notna()
    y = labels[ok].astype(float)
    if y.nunique() < 2:
        return float("nan")
    return float(roc_auc_score(y, scores[ok]))


def _scores_without(tiles: pd.DataFrame, gone: np.ndarray, base: pd.DataFrame, *, prob: str, topk: int):
    """:func:`slide_scores` of the tiles not ``gone``, on ``base``'s slides (NaN for a slide left empty)."""
    keep = tiles[~gone]
    return slide_scores(keep, prob=prob, topk=topk).reindex(base.index) if len(keep) else base * np.nan


def _aucs(slide_labels: pd.Series, base: pd.DataFrame, after: pd.DataFrame) -> dict[str, float]:
    """``auc_{mean,topk}_{before,after}``: the cohort AUC of each slide score before and after."""
    lab = slide_labels.reindex(base.index)
    out = {}
    for agg in ("mean", "topk"):
        out[f"auc_{agg}_before"], out[f"auc_{agg}_after"] = _auc(lab, base[agg]), _auc(lab, after[agg])
    return out


def cluster_removal(
    tiles: pd.DataFrame,
    *,
    slide_labels: pd.Series | None = None,
    prob: str = "prob_pos",
    topk: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop each cluster's tiles and recompute the slide scores.

    Parameters
    ----------
    tiles : DataFrame with slide_id, cluster and ``prob`` (not modified).
    slide_labels : Series slide_id -> 1 / 0 (positive slide or not), optional; gives cohort AUCs.

    Returns
    -------
    per_slide : one row per (cluster, slide) with ``mean``/``topk`` before and after and their
        change (``d_mean``, ``d_topk``); a slide left with no tile keeps NaN after.
    per_cluster : one row per cluster: ``n_tiles``, ``n_slides``, ``mean_abs_d_mean``,
        ``max_abs_d_mean``, ``mean_abs_d_topk``, ``max_abs_d_topk`` and, with labels,
        ``auc_mean``/``auc_topk`` before, after and their change ``d_auc_mean``, ``d_auc_topk``.
    """
    base = slide_scores(tiles, prob=prob, topk=topk)
    rows, summary = [], []
    for c in sorted(tiles["cluster"].unique()):
        after = _scores_without(tiles, (tiles["cluster"] == c).to_numpy(), base, prob=prob, topk=topk)
        touched = sorted(tiles.loc[tiles["cluster"] == c, "slide_id"].unique())
        d = after[["mean", "topk"]] - base[["mean", "topk"]]
        for sid in touched:
            rows.append(
                {
                    "cluster": int(c),
                    "slide_id": sid,
                    "mean_before": base.at[sid, "mean"],
                    "mean_after": after.at[sid, "mean"],
                    "topk_before": base.at[sid, "topk"],
                    "topk_after": after.at[sid, "topk"],
                    "d_mean": d.at[sid, "mean"],
                    "d_topk": d.at[sid, "topk"],
                }
            )
        rec = {
            "cluster": int(c),
            "n_tiles": int((tiles["cluster"] == c).sum()),
            "n_slides": len(touched),
            "mean_abs_d_mean": float(d["mean"].abs().mean(skipna=True)),
            "max_abs_d_mean": float(d["mean"].abs().max(skipna=True)),
            "mean_abs_d_topk": float(d["topk"].abs().mean(skipna=True)),
            "max_abs_d_topk": float(d["topk"].abs().max(skipna=True)),
        }
        if slide_labels is not None:
            aucs = _aucs(slide_labels, base, after)
            for agg in ("mean", "topk"):
                before_auc, after_auc = aucs[f"auc_{agg}_before"], aucs[f"auc_{agg}_after"]
                rec[f"auc_{agg}_before"], rec[f"auc_{agg}_after"] = before_auc, after_auc
                rec[f"d_auc_{agg}"] = after_auc - before_auc
        summary.append(rec)
    per_slide = pd.DataFrame(rows)
    per_cluster = pd.DataFrame(summary).sort_values("mean_abs_d_mean", ascending=False, ignore_index=True)
    return per_slide, per_cluster


def group_removal(
    tiles: pd.DataFrame,
    clusters,
    *,
    slide_labels: pd.Series | None = None,
    prob: str = "prob_pos",
    topk: int = 8,
) -> tuple[pd.DataFrame, dict]:
    """Drop the tiles of several clusters at once (those a pathologist marked as artefacts, say)
    and recompute the slide scores.

    Parameters
    ----------
    tiles : DataFrame with slide_id, cluster and ``prob`` (not modified).
    clusters : iterable of int
        The clusters removed together.
    slide_labels : Series slide_id -> 1 / 0, optional; gives the cohort AUCs before and after.

    Returns
    -------
    per_slide : one row per slide that loses tiles: ``n_removed``, ``n_left``, ``mean``/``topk``
        before and after and their change (NaN after when nothing is left), sorted by ``|d_topk|``.
    summary : dict with ``clusters``, ``n_tiles`` removed, ``n_slides`` touched, ``n_emptied``
        (slides left with no tile) and, with labels, ``auc_mean``/``auc_topk`` ``_before`` and
        ``_after`` (AUC over the slides that keep a score).
    """
    drop = sorted({int(c) for c in clusters})
    gone = tiles["cluster"].isin(drop).to_numpy()
    base = slide_scores(tiles, prob=prob, topk=topk)
    after = _scores_without(tiles, gone, base, prob=prob, topk=topk)
    removed = tiles.loc[gone].groupby("slide_id").size()
    per_slide = pd.DataFrame(
        {
            "n_removed": removed,
            "n_left": base["n_tiles"].reindex(removed.index) - removed,
            "mean_before": base["mean"].reindex(removed.index),
            "mean_after": after["mean"].reindex(removed.index),
            "topk_before": base["topk"].reindex(removed.index),
            "topk_after": after["topk"].reindex(removed.index),
        }
    )
    per_slide["d_mean"] = per_slide["mean_after"] - per_slide["mean_before"]
    per_slide["d_topk"] = per_slide["topk_after"] - per_slide["topk_before"]
    per_slide = per_slide.assign(a=per_slide["d_topk"].abs()).sort_values("a", ascending=False, kind="stable")
    per_slide = per_slide.drop(columns="a").rename_axis("slide_id").reset_index()
    summary = {
        "clusters": drop,
        "n_tiles": int(gone.sum()),
        "n_slides": int(len(per_slide)),
        "n_emptied": int((per_slide["n_left"] == 0).sum()),
    }
    if slide_labels is not None:
        summary.update(_aucs(slide_labels, base, after))
    return per_slide, summary
