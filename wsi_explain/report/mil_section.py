"""The cohort report's MIL section: what the slide-level head's decisions rest on, in words and a
table, from the tables of ``wsi-explain mil`` (``cohort/mil.json``, ``mil_clusters.parquet``,
``mil_counterfactuals.parquet``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

__all__ = ["mil_section"]

_KIND = {"attention": "attention", "grad_x_input": "gradient x input", "integrated_gradients": "Integrated Gradients"}


def _f(v, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _table(clusters: pd.DataFrame, summary: dict, cname: Callable[[int], str]) -> pd.DataFrame:
    """One row per cluster, the clusters the decisions rest on most first."""
    t = clusters.sort_values("max_abs_d_prob_removed", ascending=False, na_position="last")
    out = pd.DataFrame(
        {
            "cluster": [cname(int(c)) for c in t["cluster"]],
            "max |Δ slide probability| when removed": t["max_abs_d_prob_removed"].to_numpy(),
            "mean attention (1 = uniform)": t.get("mean_attention", pd.Series(float("nan"), index=t.index)).to_numpy(),
            "mean relevance (IG)": t["mean_integrated_gradients"].to_numpy(),
            "mean relevance (gradient x input)": t["mean_grad_x_input"].to_numpy(),
        }
    )
    for key, title in (("auc_without_cluster", "cohort AUC without it"), ("qwk_without_cluster", "QWK without it")):
        if key in summary:
            out[title] = [summary[key].get(str(int(c)), float("nan")) for c in t["cluster"]]
    return out


def mil_section(run_path: str | Path, cname: Callable[[int], str]) -> dict | None:
    """Sentences and a table (HTML, every cell escaped) for the report, or None when the run has no
    MIL head.

    Parameters
    ----------
    run_path : the run folder.
    cname : cluster id -> display name (the pathologist's name when given).
    """
    cdir = Path(run_path) / "cohort"
    if not (cdir / "mil.json").exists() or not (cdir / "mil_clusters.parquet").exists():
        return None
    s = json.loads((cdir / "mil.json").read_text())
    clusters = pd.read_parquet(cdir / "mil_clusters.parquet")
    cf = pd.read_parquet(cdir / "mil_counterfactuals.parquet")
    table = _table(clusters, s, cname)
    lines = []
    if len(table) and pd.notna(table.iloc[0, 1]):
        top = table.iloc[0]
        att = top["mean attention (1 = uniform)"]
        lines.append(
            f"The slide decisions of the MIL head ({s['head']}, {s['n_slides']} slides) rest most on "
            f"{top['cluster']}: removing its tiles from every bag moves a slide's probability by up to "
            f"{_f(top.iloc[1])}"
            + (f"; its tiles get {_f(att)} times the average attention" if pd.notna(att) else "")
            + f"; mean Integrated Gradients relevance {_f(top['mean relevance (IG)'], '{:.3g}')}."
        )
    faith = s.get("faithfulness") or {}
    if faith:
        best = max(faith, key=lambda k: -1e9 if math.isnan(faith[k]) else faith[k])
        lines.append(
            "Agreement of each relevance kind with leaving tiles out one at a time (mean Spearman per slide): "
            + ", ".join(f"{_KIND.get(k, k)} {_f(v)}" for k, v in faith.items())
            + f". The most faithful here: {_KIND.get(best, best)}."
            + (
                " None agrees well (a negative value ranks tiles against their leave-one-out effect): for this"
                " head, read the leave-one-out values themselves (mil_leave_one_out, on a sample of tiles)."
                if not faith[best] >= 0.5
                else ""
            )
        )
    top_rel = cf[cf["kind"] == "remove_top_relevant"]["d_prob"]
    if len(top_rel):
        lines.append(
            f"Removing each slide's most relevant tiles (by IG) moves its probability by {_f(top_rel.mean())} "
            f"on average (from {_f(top_rel.min())} to {_f(top_rel.max())})."
        )
    added = cf[cf["kind"] == "add_cluster_to_negative"]
    if len(added):
        worst = added.loc[added["d_prob"].idxmax()]
        lines.append(
            f"Adding tiles of {cname(int(worst['cluster']))} from other slides to a negative bag raises its "
            f"probability most: by {_f(worst['d_prob'])} on {worst['slide_id']}."
        )
    if "auc_before" in s:
        lines.append(f"Cohort AUC of the head: {_f(s['auc_before'], '{:.3f}')}.")
    if "qwk_before" in s:
        lines.append(
            f"Quadratic-weighted kappa of its predicted class with the ISUP grades: {_f(s['qwk_before'], '{:.3f}')}."
        )
    import viz
    from wsi_explain.report.pages import fragment

    return {"lines": lines, "table": fragment(viz.table_html(table)), "frame": table}
