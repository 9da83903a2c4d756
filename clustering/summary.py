"""Per-cluster summaries and the flags an auditor uses to find shortcuts.

Input is the cohort tile table (one row per tile) with these columns, the optional ones used
when present:

- ``slide_id``, ``tile_id``, ``cluster`` (-1 = noise), ``membership``, ``outlier_score``
- ``pred`` (int), ``confidence`` (max probability), ``prob_pos`` (probability of the positive class)
- optional: ``tissue_frac``, ``ink_frac``, ``sharpness``, ``od_h``, ``od_e``, ``brightness`` (the
  tiling QC columns), ``cam_off_tissue`` (share of attribution mass off tissue), ``label_pos``
  (1/0/NaN: tile or slide label, positive or not), a site column (``site``, ``provider``,
  ``data_provider``, ``scanner`` or ``center``: the first present), ``concept_<k>``
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .staining import tile_stain_outliers

__all__ = ["FlagRules", "summarize_clusters", "off_tissue_fraction", "FLAG_NAMES", "SITE_COLUMNS", "GRADE_COLUMNS"]

#: slide-level label columns whose mix is reported per cluster
GRADE_COLUMNS = ("label", "isup_grade", "gleason_score", "grade")

#: cohort CSV columns that name where a slide comes from (checked in this order; the confounder
#: scan and the site-leakage tests read the same list)
SITE_COLUMNS = ("site", "provider", "data_provider", "scanner", "center", "centre", "lab")

FLAG_NAMES = {
    "dominated": "dominated by one slide or site",
    "artefact_positive": "the model leans on artefact tiles (pen ink, blur, off-range stain or little tissue)",
    "off_tissue": "attribution mass mostly off tissue",
    "label_disagreement": "labels disagree with predictions",
}


@dataclass(frozen=True)
class FlagRules:
    """Thresholds of the cluster flags (all fractions in [0, 1]).

    Attributes
    ----------
    slide_dominance : a cluster is dominated when its largest slide holds at least this share...
    min_slides : ...and the cohort has at least this many slides.
    site_dominance : or, without a permutation test, when its largest site holds this share while
        the cohort has 2+ sites and that site's cohort share is at least ``site_excess`` lower.
    site_p : with a permutation p-value per cluster (``site_p`` of :func:`summarize_clusters`: the
        site mix against the cohort's, sites shuffled across slides), the site part of the flag is
        p below this and the largest site ``site_excess`` above its cohort share, in place of the
        fixed ``site_dominance`` share.
    positive_rate, positive_excess, removal : artefact flag when the model leans on the cluster
        (its positive rate is at least ``positive_rate`` and exceeds the cohort's by
        ``positive_excess``, or removing it moves some slide's top-k score by at least ``removal``)...
    low_tissue, tile_ink, ink_share, sharpness, blur_share : ...and its tiles are artefacts: mean
        tissue fraction below ``low_tissue``, or at least ``ink_share`` of its tiles with an ink
        fraction of ``tile_ink`` or more, or at least ``blur_share`` of its tiles out of focus
        (sharpness below ``sharpness``, the tiling QC's measure)...
    stain_iqr, stain_share : ...or at least ``stain_share`` of its tiles stained outside the
        cohort's range: haematoxylin or eosin staining strength (the tiling QC's ``h_p90`` and
        ``e_p90``, per-pixel 90th percentiles; the mean densities without them) beyond the cohort's
        quartiles by more than ``stain_iqr`` interquartile ranges (a far-out value by Tukey's rule:
        dense nuclei stay within the cohort's range).
    stain_slide_z, stain_slide_ratio, stain_min_slides : the artefact slices (not the cluster
        flags) also count every tile of a slide stained apart: its median H:E balance has a
        modified z-score of at least ``stain_slide_z`` among the slides and differs from their
        median by a factor ``stain_slide_ratio`` or more (with at least ``stain_min_slides``
        slides; :mod:`clustering.staining`). Tumour slides can differ so from benign ones (more
        nuclei), so this rule is read only with the slices' within-label comparison.
    off_tissue : attribution flag when the mean share of attribution off tissue is at least this.
    agreement : label flag when fewer than this share of labelled tiles agree with predictions...
    min_labelled : ...among at least this many labelled tiles.
    min_size : clusters smaller than this get no flag.
    """

    slide_dominance: float = 0.8
    min_slides: int = 3
    site_dominance: float = 0.9
    site_excess: float = 0.3
    site_p: float = 0.01
    positive_rate: float = 0.5
    positive_excess: float = 0.2
    removal: float = 0.1
    low_tissue: float = 0.6
    tile_ink: float = 0.05
    ink_share: float = 0.3
    sharpness: float = 0.06
    blur_share: float = 0.5
    stain_iqr: float = 3.0
    stain_share: float = 0.5
    stain_slide_z: float = 3.5
    stain_slide_ratio: float = 1.25
    stain_min_slides: int = 6
    off_tissue: float = 0.5
    agreement: float = 0.5
    min_labelled: int = 10
    min_size: int = 10


def off_tissue_fraction(cams: np.ndarray, on_tissue: np.ndarray) -> np.ndarray:
    """Share of each map's (non-negative) mass on cells that are not tissue.

    Parameters
    ----------
    cams : (n, h, w) >= 0
    on_tissue : (n, h, w) bool, tissue at the same cells

    Returns
    -------
    (n,) float32; NaN for an all-zero map.
    """
    c = np.clip(np.asarray(cams, np.float64), 0, None)
    total = c.sum((1, 2))
    off = (c * ~np.asarray(on_tissue, bool)).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, off / total, np.nan).astype(np.float32)


def _ref(df: pd.DataFrame, idx) -> list[str]:
    return [f"{s}:{int(t)}" for s, t in zip(df.loc[idx, "slide_id"], df.loc[idx, "tile_id"])]


def _representatives(g: pd.DataFrame, space: np.ndarray | None, n: int) -> dict:
    out = {}
    if space is not None:
        pts = space[g.index.to_numpy()]
        d = np.linalg.norm(pts - pts.mean(0), axis=1)
        out["medoid"] = _ref(g, g.index[np.argsort(d, kind="stable")[:n]])
    out["most_member"] = _ref(g, g.sort_values("membership", ascending=False, kind="stable").index[:n])
    out["most_confident"] = _ref(g, g.sort_values("confidence", ascending=False, kind="stable").index[:n])
    border = (g["prob_pos"] - 0.5).abs() if "prob_pos" in g else g["confidence"]
    out["borderline"] = _ref(g, border.sort_values(kind="stable").index[:n])
    out["outliers"] = _ref(g, g.sort_values("outlier_score", ascending=False, kind="stable").index[:n])
    return out


def summarize_clusters(
    tiles: pd.DataFrame,
    *,
    space: np.ndarray | None = None,
    rules: FlagRules = FlagRules(),
    n_representatives: int = 8,
    positive_name: str = "positive",
    removal: dict | None = None,
    site_p: dict | None = None,
) -> pd.DataFrame:
    """One row per cluster (noise, -1, last) with composition, representatives and flags.

    Parameters
    ----------
    tiles : cohort tile table (see the module docstring); not modified.
    space : (n, d), optional
        Coordinates the clustering used (row-aligned with ``tiles``), for the medoid tiles.
    rules : FlagRules
    n_representatives : int
        Tiles listed per kind of representative.
    removal : dict cluster -> float, optional
        How far removing the cluster moves some slide's top-k score (``max_abs_d_topk`` of the
        cluster-removal experiment); read by the artefact flag.
    site_p : dict cluster -> float, optional
        Permutation p-value of the cluster's site mix against the cohort's (over slides); read by
        the site part of the ``dominated`` flag instead of the fixed share rule.

    Returns
    -------
    DataFrame with ``cluster, size, n_slides, top_slide, slide_dominance, top_site, site_dominance,
    pred_mix (JSON), positive_rate, mean_confidence, mean_membership, mean_tissue, mean_ink,
    ink_tile_share, blur_tile_share, stain_tile_share, mean_sharpness, mean_od_h, mean_od_e, mean_brightness,
    removal_effect, site_p, mean_cam_off_tissue, n_labelled, label_purity, label_agreement,
    concept_mix (JSON), top_concept,
    representatives (JSON of "slide:tile" lists), flags (list of keys), flag_reasons (list of
    sentences), artefact_kinds (list of the artefacts the tiles show: low_tissue, ink, blur,
    stain)``.
    """
    df = tiles.reset_index(drop=True)
    n_slides_cohort = df["slide_id"].nunique()
    cohort_pos = float((df["pred"] == 1).mean()) if "pred" in df else float("nan")
    site_col = next((c for c in SITE_COLUMNS if c in df.columns), None)
    has_site = site_col is not None and df[site_col].nunique() > 1
    site_share = df[site_col].value_counts(normalize=True) if has_site else None
    concept_cols = [c for c in df.columns if c.startswith("concept_")]
    off_stain = tile_stain_outliers(df, rules)
    rows = []
    for cl, g in df.groupby("cluster", sort=True):
        row = {**_composition(g, int(cl), rules, removal), **_site(g, site_col if has_site else None)}
        row["stain_tile_share"] = float(off_stain[g.index].mean()) if off_stain is not None else float("nan")
        row["site_p"] = float((site_p or {}).get(int(cl), float("nan")))
        row["artefact_kinds"] = [k for k, _ in _artefacts(row, rules)]
        row.update(_labels(g))
        row.update(_concept_mix(g, concept_cols))
        row["representatives"] = json.dumps(_representatives(g, space, n_representatives))
        flags, reasons = (
            ([], [])
            if cl < 0 or len(g) < rules.min_size
            else _flags(row, rules, n_slides_cohort, cohort_pos, site_share, positive_name)
        )
        row["flags"], row["flag_reasons"] = flags, reasons
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out = pd.concat([out[out["cluster"] >= 0], out[out["cluster"] < 0]], ignore_index=True)
    return out


def _mean(g: pd.DataFrame, col: str) -> float:
    return float(g[col].mean()) if col in g else float("nan")


def _mix(values: pd.Series) -> str:
    """JSON {value: share} of a column, sorted by value, shares rounded to 4 places."""
    return json.dumps({str(k): round(float(v), 4) for k, v in values.value_counts(normalize=True).sort_index().items()})


def _composition(g: pd.DataFrame, cl: int, rules: FlagRules, removal: dict | None) -> dict:
    """Size, slides, predictions, QC means and shares, removal effect, CAM shares and grade mixes of
    one cluster's tiles ``g``."""
    size, slides = len(g), g["slide_id"].value_counts()
    return {
        "cluster": cl,
        "size": size,
        "n_slides": int(len(slides)),
        "top_slide": str(slides.index[0]),
        "slide_dominance": float(slides.iloc[0] / size),
        "pred_mix": _mix(g["pred"]),
        "positive_rate": float((g["pred"] == 1).mean()),
        "mean_confidence": float(g["confidence"].mean()),
        "mean_membership": float(g["membership"].mean()),
        "mean_tissue": _mean(g, "tissue_frac"),
        "mean_ink": _mean(g, "ink_frac"),
        "ink_tile_share": float((g["ink_frac"] >= rules.tile_ink).mean()) if "ink_frac" in g else float("nan"),
        "blur_tile_share": float((g["sharpness"] < rules.sharpness).mean()) if "sharpness" in g else float("nan"),
        **{f"mean_{c}": _mean(g, c) for c in ("sharpness", "od_h", "od_e", "brightness")},
        "removal_effect": float((removal or {}).get(cl, float("nan"))),
        "mean_cam_off_tissue": _mean(g, "cam_off_tissue"),
        "mean_cam_on_ink": _mean(g, "cam_on_ink"),
        # slide-level grades of the cohort CSV (PANDA-style), as the share of tiles per value
        **{f"{c}_mix": _mix(g[c].astype(str)) for c in GRADE_COLUMNS if c in g},
    }


def _site(g: pd.DataFrame, site_col: str | None) -> dict:
    """The cluster's most common site and its share (None / NaN without a varying site column)."""
    row = {"top_site": None, "site_dominance": float("nan"), "site_column": site_col}
    if site_col is not None:
        sites = g[site_col].value_counts()
        row["top_site"], row["site_dominance"] = str(sites.index[0]), float(sites.iloc[0] / len(g))
    return row


def _labels(g: pd.DataFrame) -> dict:
    """Tiles with a label, label purity and the agreement of predictions with labels."""
    lab = g["label_pos"].dropna() if "label_pos" in g else pd.Series(dtype=float)
    if not len(lab):
        return {"n_labelled": 0, "label_purity": float("nan"), "label_agreement": float("nan")}
    agree = ((g.loc[lab.index, "pred"] == 1).astype(int) == lab.astype(int)).mean()
    return {
        "n_labelled": int(len(lab)),
        "label_purity": float(max(lab.mean(), 1 - lab.mean())),
        "label_agreement": float(agree),
    }


def _concept_mix(g: pd.DataFrame, concept_cols: list[str]) -> dict:
    """Mean concept weights normalised to sum 1 (JSON) and the top concept (-1 without concepts)."""
    if not concept_cols:
        return {"concept_mix": "{}", "top_concept": -1}
    mix = g[concept_cols].mean()
    total = mix.sum()
    mix = mix / total if total > 0 else mix
    return {
        "concept_mix": json.dumps({c.removeprefix("concept_"): round(float(v), 4) for c, v in mix.items()}),
        "top_concept": int(mix.values.argmax()),
    }


def _flags(row, rules: FlagRules, n_slides_cohort, cohort_pos, site_share, positive_name):
    flags, reasons = [], []
    if n_slides_cohort >= rules.min_slides and row["slide_dominance"] >= rules.slide_dominance:
        flags.append("dominated")
        reasons.append(
            f"{100 * row['slide_dominance']:.0f}% of its {row['size']} tiles come from slide {row['top_slide']} "
            f"(the cohort has {n_slides_cohort} slides)"
        )
    elif site_share is not None:
        cohort = float(site_share.get(row["top_site"], 0.0))
        tested = row["site_p"] == row["site_p"]  # a permutation p-value is known
        share_ok = row["site_p"] < rules.site_p if tested else row["site_dominance"] >= rules.site_dominance
        if share_ok and row["site_dominance"] - cohort >= rules.site_excess:
            flags.append("dominated")
            reasons.append(
                f"{100 * row['site_dominance']:.0f}% of its tiles come from {row['site_column']} {row['top_site']} "
                f"(which holds {100 * cohort:.0f}% of the cohort's tiles"
                + (f"; permutation p = {row['site_p']:.3f} over slides)" if tested else ")")
            )
    artefact = _artefact_reasons(row, rules)
    leans = _leaning_reasons(row, rules, cohort_pos, positive_name)
    if artefact and leans:
        flags.append("artefact_positive")
        reasons.append(f"{' and '.join(artefact)}, and the model leans on it: {' and '.join(leans)}")
    if row["mean_cam_off_tissue"] >= rules.off_tissue:
        flags.append("off_tissue")
        reasons.append(
            f"on average {100 * row['mean_cam_off_tissue']:.0f}% of the attribution mass lies on background or ink, "
            "not on tissue"
        )
    if row["n_labelled"] >= rules.min_labelled and row["label_agreement"] < rules.agreement:
        flags.append("label_disagreement")
        reasons.append(
            f"only {100 * row['label_agreement']:.0f}% of its {row['n_labelled']} labelled tiles agree with "
            "the model's prediction"
        )
    return flags, reasons


def _artefacts(row: dict, rules: FlagRules) -> list[tuple[str, str]]:
    """(kind, reason in words) of what makes a cluster's tiles artefacts (empty when nothing does)."""
    why = []
    if row["mean_tissue"] < rules.low_tissue:
        why.append(("low_tissue", f"its mean tissue fraction is only {row['mean_tissue']:.2f}"))
    if row["ink_tile_share"] >= rules.ink_share:
        why.append(
            (
                "ink",
                f"{100 * row['ink_tile_share']:.0f}% of its tiles carry pen ink (ink fraction of "
                f"{100 * rules.tile_ink:.0f}% or more; {100 * row['mean_ink']:.0f}% of its area on average)",
            )
        )
    if row["blur_tile_share"] >= rules.blur_share:
        why.append(
            (
                "blur",
                f"{100 * row['blur_tile_share']:.0f}% of its tiles are out of focus "
                f"(sharpness below {rules.sharpness:g})",
            )
        )
    if row.get("stain_tile_share", np.nan) >= rules.stain_share:
        why.append(
            (
                "stain",
                f"{100 * row['stain_tile_share']:.0f}% of its tiles are stained outside the cohort's range "
                f"(H or E staining strength more than {rules.stain_iqr:g} IQR beyond the quartiles)",
            )
        )
    return why


def _artefact_reasons(row: dict, rules: FlagRules) -> list[str]:
    """What makes a cluster's tiles artefacts, in words (empty when nothing does)."""
    return [reason for _, reason in _artefacts(row, rules)]


def _leaning_reasons(row: dict, rules: FlagRules, cohort_pos: float, positive_name: str) -> list[str]:
    """Why the model's output rests on the cluster, in words (empty when it does not)."""
    why = []
    pos = row["positive_rate"]
    if pos >= rules.positive_rate and pos - cohort_pos >= rules.positive_excess:
        why.append(f"{100 * pos:.0f}% of its tiles are predicted {positive_name} (cohort: {100 * cohort_pos:.0f}%)")
    if row["removal_effect"] >= rules.removal:
        why.append(f"removing it moves a slide's top-k score by up to {row['removal_effect']:.2f}")
    return why
