"""What each saliency metric means and which way it improves: one table, read by the score stage
(gains against reference maps) and by the reports (the metric tables' "better" and "meaning")."""

from __future__ import annotations

__all__ = ["HIGHER_IS_BETTER", "TABLE_DIRECTIONS", "METRIC_MEANINGS", "direction", "metric_info"]

#: faithfulness and localisation metric (without the baseline suffix) -> True when higher is
#: better, False when lower is; the gains against reference maps are computed for these
HIGHER_IS_BETTER = {
    "deletion_auc": False,  # the target probability falls fast when the relevant pixels go first
    "insertion_auc": True,
    "dic_multiply": False,  # Drop in Confidence
    "dic_mask": False,
    "iic_multiply": True,  # Increase in Confidence
    "iic_mask": True,
    "road_morf": False,  # imputing the most relevant pixels lowers the probability
    "road_lerf": True,  # imputing the least relevant pixels keeps it (closer to 0 from below)
    "road_combined": True,
    "infidelity": False,
    "sensitivity": False,
    "pointing_game": True,
    "graded_hit": True,
    "relevance_mass": True,
    "relevance_rank": True,
    "iou": True,
    "coverage": True,
}

#: the directions the report tables show: the above, and the descriptive metrics that have one
TABLE_DIRECTIONS = {**HIGHER_IS_BETTER, "tissue_share": True, "sanity_spearman": False, "sanity_ssim": False}

#: metric (without the baseline suffix) -> one line a reader can act on
METRIC_MEANINGS = {
    "deletion_auc": "area under the target probability as the most relevant pixels are blurred away first",
    "insertion_auc": "area under the target probability as the most relevant pixels are restored first",
    "dic_multiply": "drop in confidence when the image is weighted by the map",
    "dic_mask": "drop in confidence when only the map's top pixels are kept",
    "iic_multiply": "share of tiles whose confidence rises when weighted by the map",
    "iic_mask": "share of tiles whose confidence rises when only the top pixels are kept",
    "road_morf": "probability left when the most relevant pixels are imputed (ROAD)",
    "road_lerf": "probability left when the least relevant pixels are imputed (ROAD)",
    "road_combined": "ROAD's least-relevant-first minus most-relevant-first curves",
    "infidelity": "how far the map misjudges the output change under small perturbations",
    "sensitivity": "how much the map changes when the input is nudged",
    "pointing_game": "share of tiles whose map peak lies inside the annotation",
    "graded_hit": "annotation share at the map's peak",
    "relevance_mass": "share of the map's mass inside the annotation",
    "relevance_rank": "share of the annotation among the map's top pixels",
    "iou": "overlap of the map's top pixels with the annotation",
    "coverage": "share of the annotation the map's top pixels cover",
    "tissue_share": "share of the map's mass on tissue (not glass or ink)",
    "gini": "how concentrated the map is (1 = one pixel, 0 = flat)",
    "entropy": "how spread the map is",
    "sanity_spearman": "rank correlation of the map before and after randomising the model (low: it reads the model)",
    "sanity_ssim": "structural similarity of the map before and after randomising the model",
    "removal_max_abs_d_topk": "largest change of a slide's top-k score when the cluster's tiles are dropped",
    "removal_mean_abs_d_topk": "mean change of the slides' top-k scores when the cluster's tiles are dropped",
    "removal_max_abs_d_mean": "largest change of a slide's mean probability when the cluster's tiles are dropped",
    "removal_mean_abs_d_mean": "mean change of the slides' mean probabilities when the cluster's tiles are dropped",
    "removal_auc_topk": "cohort AUC of the top-k slide score, before or after dropping the cluster",
    "removal_auc_mean": "cohort AUC of the mean slide score, before or after dropping the cluster",
    "removal_d_auc_topk": "change of the cohort AUC (top-k score) when the cluster is dropped",
    "removal_d_auc_mean": "change of the cohort AUC (mean score) when the cluster is dropped",
}


def _base(metric: str, table: dict) -> str | None:
    if metric in table:
        return metric
    for name in table:
        if metric.startswith(name + "_"):
            return name
    return None


def direction(metric: str) -> bool | None:
    """True (higher is better), False (lower is better) or None (no direction) for a faithfulness or
    localisation metric, a baseline suffix allowed (``deletion_auc_blur`` -> ``deletion_auc``)."""
    base = _base(metric, HIGHER_IS_BETTER)
    return None if base is None else HIGHER_IS_BETTER[base]


def metric_info(metric: str) -> tuple[str, str]:
    """("higher" / "lower" / "", meaning or "") of any metric name the tables show."""
    d = _base(metric, TABLE_DIRECTIONS)
    m = _base(metric, METRIC_MEANINGS)
    better = "" if d is None else ("higher" if TABLE_DIRECTIONS[d] else "lower")
    return better, METRIC_MEANINGS.get(m, "") if m else ""
