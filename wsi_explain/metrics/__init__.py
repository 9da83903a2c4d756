"""Saliency metrics: plain functions with explicit inputs, returning per-input arrays.

Faithfulness (deletion/insertion, Drop/Increase in Confidence, ROAD with its batched imputation,
infidelity) with reference maps and metric directions, robustness
(sensitivity), localisation (pointing game, graded hit, relevance mass and rank, IoU/coverage),
complexity (Gini, entropy, mass on a region), ensemble spread, the cascading randomisation sanity
check and cluster removal. The score stage (:mod:`wsi_explain.stages.score`) applies them per
cluster.
"""

from .complexity import entropy, gini, mass_share
from .ensemble import ensemble_spread, fit_spread_relations
from .faithfulness import confidence_change, curve_auc, infidelity_score, make_baseline, perturbation_curve, road
from .imputation import linear_impute
from .localisation import graded_hit, iou_coverage, pointing_game, relevance_mass, relevance_rank
from .reference import HIGHER_IS_BETTER, REFERENCE_METHODS, direction, reference_maps
from .removal import cluster_removal, group_removal, slide_labels, slide_scores
from .robustness import sensitivity
from .sanity import cascading_randomisation, randomisation_blocks, spearman_rows, ssim_rows
from .stats import bootstrap_ci

__all__ = [
    "perturbation_curve",
    "curve_auc",
    "make_baseline",
    "confidence_change",
    "road",
    "linear_impute",
    "reference_maps",
    "direction",
    "HIGHER_IS_BETTER",
    "REFERENCE_METHODS",
    "infidelity_score",
    "sensitivity",
    "pointing_game",
    "graded_hit",
    "relevance_mass",
    "relevance_rank",
    "iou_coverage",
    "gini",
    "entropy",
    "mass_share",
    "ensemble_spread",
    "fit_spread_relations",
    "cascading_randomisation",
    "randomisation_blocks",
    "spearman_rows",
    "ssim_rows",
    "cluster_removal",
    "group_removal",
    "slide_labels",
    "slide_scores",
    "bootstrap_ci",
]
