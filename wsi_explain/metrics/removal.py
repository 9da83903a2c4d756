"""Cluster removal: how much do the slide-level decisions rest on each cluster?

Slide scores are aggregated from tile probabilities (mean, and mean of the top k); each cluster
in turn is dropped from every slide and the scores recomputed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["slide_scores", "cluster_removal"]


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


def _auc(labels: pd.Series, scores: pd.Series) -> float:
    from sklearn.metrics import roc_auc_score

    ok = labels.notna() & scores.notna()
    y = labels[ok].astype(float)
    if y.nunique() < 2:
        return float("nan")
    return float(roc_auc_score(y, scores[ok]))


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
        keep = tiles[tiles["cluster"] != c]
        after = slide_scores(keep, prob=prob, topk=topk).reindex(base.index) if len(keep) else base * np.nan
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
            lab = slide_labels.reindex(base.index)
            for agg in ("mean", "topk"):
                before_auc, after_auc = _auc(lab, base[agg]), _auc(lab, after[agg])
                rec[f"auc_{agg}_before"], rec[f"auc_{agg}_after"] = before_auc, after_auc
                rec[f"d_auc_{agg}"] = after_auc - before_auc
        summary.append(rec)
    per_slide = pd.DataFrame(rows)
    per_cluster = pd.DataFrame(summary).sort_values("mean_abs_d_mean", ascending=False, ignore_index=True)
    return per_slide, per_cluster
