"""A cluster page's opening card: what a pathologist needs to know about a cluster, in words.

One sentence per question, from the cluster summary (``cohort/clusters.parquet``), the score
stage's metrics and sanity check, and the pathologist's verdict:

1. what the model predicts here and how confidently (and how often the labels agree);
2. what the tiles are and what the maps look at (tissue, ink, out of focus; the attribution mass
   off tissue and on ink);
3. whether the chosen method's explanation beats a random map on faithfulness (paired over the
   same tiles, from the ``_gain_vs_random`` rows);
4. whether it passes the model-randomisation check;
5. the flags and their reasons (listed on the page), the cluster-removal effect;
6. the verdict.

Missing inputs (an unscored run, no labels, no verdict) give a sentence saying so, not a gap.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["cluster_card"]


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.0f}%"


def _num(row: dict, key: str) -> float:
    v = row.get(key)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _prediction(row: dict, cohort_positive: float, positive_name: str) -> str:
    text = (
        f"The model predicts {_pct(row.get('positive_rate'))} of its {int(row['size'])} tiles on "
        f"{int(row['n_slides'])} slides {positive_name} (the cohort: {_pct(cohort_positive)}), with a mean "
        f"confidence of {_num(row, 'mean_confidence'):.2f}."
    )
    if _num(row, "n_labelled") > 0:
        text += f" Labels agree with the predictions on {_pct(row.get('label_agreement'))} of its labelled tiles."
    return text


def _looks_at(row: dict, cam: str) -> str:
    tiles = (
        f"Its tiles hold {_pct(row.get('mean_tissue'))} tissue on average; {_pct(row.get('ink_tile_share'))} carry "
        f"pen ink and {_pct(row.get('blur_tile_share'))} are out of focus."
    )
    off, ink = _num(row, "mean_cam_off_tissue"), _num(row, "mean_cam_on_ink")
    if math.isnan(off):
        return tiles + f" Where the {cam} maps lie was not measured."
    maps = f" The {cam} maps put {_pct(off)} of their mass off tissue"
    maps += f" and {_pct(ink)} on ink." if not math.isnan(ink) else "."
    return tiles + maps


def _faithfulness(metrics: pd.DataFrame | None, cam: str) -> str:
    if metrics is None or not len(metrics):
        return "Faithfulness was not scored (run `wsi-explain score`)."
    mine = metrics[(metrics["method"] == cam) & metrics["metric"].str.endswith("_gain_vs_random")]
    mine = mine[mine["ci_low"].notna()]
    if not len(mine):
        return f"Faithfulness of {cam} against a random map was not scored on this cluster."
    better = mine[mine["ci_low"] > 0]["metric"].str.replace("_gain_vs_random", "", regex=False).tolist()
    worse = mine[mine["ci_high"] < 0]["metric"].str.replace("_gain_vs_random", "", regex=False).tolist()
    text = f"On faithfulness, {cam} beats a random map on {len(better)} of {len(mine)} metrics"
    text += f" ({', '.join(better)})" if better else ""
    text += f" and is worse on {len(worse)} ({', '.join(worse)})" if worse else ""
    return text + " (paired over the same tiles, 95% intervals)."


def _sanity(metrics: pd.DataFrame | None, sanity: list[dict] | None, cam: str) -> str:
    verdict = next((s for s in sanity or [] if s["method"] == cam), None)
    here = None
    if metrics is not None and len(metrics):
        rows = metrics[(metrics["method"] == cam) & (metrics["metric"] == "sanity_spearman")]
        here = float(rows["value"].iloc[0]) if len(rows) else None
    if verdict is None and here is None:
        return "The model-randomisation check was not run."
    text = "The model-randomisation check: "
    if verdict is not None:
        text += f"{cam} {'passes' if verdict['passed'] else 'FAILS'} over the cohort"
    if here is not None:
        text += ("; " if verdict is not None else "") + (
            f"on this cluster its maps keep a rank correlation of {here:.2f} after the weights are randomised "
            "(near 0: the maps depend on what the model learned)"
        )
    return text + "."


def _removal(row: dict) -> str:
    eff = _num(row, "removal_effect")
    if math.isnan(eff):
        return "The cluster-removal effect was not computed."
    return f"Removing this cluster's tiles moves some slide's top-k score by up to {eff:.2f}."


def cluster_card(
    row: dict,
    *,
    cohort_positive: float,
    cam: str,
    metrics: pd.DataFrame | None = None,
    sanity: list[dict] | None = None,
    verdict: str | None = None,
    positive_name: str = "positive",
) -> list[str]:
    """The card's sentences, in the order of the module docstring.

    Parameters
    ----------
    row : dict
        The cluster's row of ``cohort/clusters.parquet``.
    cohort_positive : float
        The cohort's predicted positive rate.
    cam : str
        The method the report shows.
    metrics : DataFrame, optional
        This cluster's rows of ``cohort/cluster_metrics.parquet``.
    sanity : list of dict, optional
        The cohort's randomisation verdicts (``method``, ``passed``, ``spearman``).
    verdict : str, optional
        The pathologist's verdict.
    """
    flags = [str(f) for f in (row.get("flags") if row.get("flags") is not None else [])]
    return [
        _prediction(row, cohort_positive, positive_name),
        _looks_at(row, cam),
        _faithfulness(metrics, cam),
        _sanity(metrics, sanity, cam),
        (f"Flags: {', '.join(flags)} (reasons below)." if flags else "No flag.") + " " + _removal(row),
        f"Verdict: {verdict}." if verdict else "No verdict yet (set one in `wsi-explain serve`).",
    ]
