"""Artefact slices: the cohort's artefact tiles by kind, wherever the clustering put them.

A cluster flag needs the artefact tiles to form a cluster of their own; when the embedding places
them among clean tissue (a stain shift the features barely see, say), no cluster flag can find
them although the model leans on them. A slice is every tile that shows one artefact by the same
tile-level rules the cluster flags use (:class:`clustering.FlagRules`): pen ink (ink fraction of
``tile_ink`` or more), out of focus (sharpness below ``sharpness``), stained outside the cohort's
range (a tile beyond ``stain_iqr`` IQR of the quartiles, or any tile of a slide stained apart:
:mod:`clustering.staining`) and little tissue (tissue fraction below ``low_tissue``).

A slice is flagged when it has at least ``min_size`` tiles and the model leans on it: its positive
rate is at least ``positive_rate`` and exceeds the rest's by ``positive_excess``. With labels
(``label_pos``: the slide's label or the tile's annotation) the excess is taken within each label
stratum and averaged over the slice's tiles: a slice that merely sits on positive slides (every
tile of a positive slide stained apart, say) is predicted positive because its slides are, and that
is no shortcut.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .staining import slide_stain_outliers, stain_outliers
from .summary import FlagRules

__all__ = ["SLICE_COLUMNS", "artefact_masks", "artefact_slices"]

SLICE_COLUMNS = ["kind", "n_tiles", "n_slides", "positive_rate", "rest_positive_rate", "excess", "flagged", "reason"]

_WORDS = {
    "ink": "tiles with pen ink",
    "blur": "out-of-focus tiles",
    "stain": "tiles stained outside the cohort's range (or on slides stained apart)",
    "low_tissue": "tiles with little tissue",
}


_RULES = FlagRules()


def artefact_masks(tiles: pd.DataFrame, rules: FlagRules = _RULES) -> dict[str, np.ndarray]:
    """kind -> (n,) bool: the tiles showing that artefact (kinds whose QC column is missing are left out)."""
    out = {}
    if "ink_frac" in tiles:
        out["ink"] = (tiles["ink_frac"] >= rules.tile_ink).to_numpy()
    if "sharpness" in tiles:
        out["blur"] = (tiles["sharpness"] < rules.sharpness).to_numpy()
    stain = stain_outliers(tiles.reset_index(drop=True), rules)
    if stain is not None:
        out["stain"] = stain
    if "tissue_frac" in tiles:
        out["low_tissue"] = (tiles["tissue_frac"] < rules.low_tissue).to_numpy()
    return out


def artefact_slices(tiles: pd.DataFrame, *, rules: FlagRules = _RULES, positive_name: str = "positive"):
    """One row per artefact kind: its tiles, slides, positive rate against the rest, whether the
    model leans on it (``flagged``) and why in words.

    Parameters
    ----------
    tiles : cohort tile table with ``slide_id``, ``pred`` (1 = positive) and the QC columns; not modified.

    Returns
    -------
    DataFrame with :data:`SLICE_COLUMNS`.
    """
    pos = (tiles["pred"] == 1).to_numpy()
    slides = tiles["slide_id"].to_numpy()
    strata = _strata(tiles)
    rows = []
    for kind, m in artefact_masks(tiles, rules).items():
        n = int(m.sum())
        rate = float(pos[m].mean()) if n else float("nan")
        rest = float(pos[~m].mean()) if (~m).any() else float("nan")
        excess = _excess(pos, m, strata)
        leans = n >= rules.min_size and rate >= rules.positive_rate and excess >= rules.positive_excess
        within = " within the same labels" if strata is not None else ""
        reason = (
            f"the model leans on the {_WORDS[kind]} wherever they are: {n} tiles on {len(set(slides[m]))} slides, "
            f"{100 * rate:.0f}% predicted {positive_name} (the other tiles: {100 * rest:.0f}%; "
            f"{100 * excess:+.0f} points{within})" + (_apart_words(tiles, rules) if kind == "stain" else "")
            if leans
            else ""
        )
        rows.append(
            {
                "kind": kind,
                "n_tiles": n,
                "n_slides": int(len(set(slides[m]))),
                "positive_rate": rate,
                "rest_positive_rate": rest,
                "excess": excess,
                "flagged": bool(leans),
                "reason": reason,
            }
        )
    return pd.DataFrame(rows, columns=SLICE_COLUMNS)


def _strata(tiles: pd.DataFrame) -> np.ndarray | None:
    """(n,) label stratum per tile (``label_pos``; unlabelled tiles form a stratum of their own),
    or None when fewer than two labels are known."""
    if "label_pos" not in tiles:
        return None
    lab = tiles["label_pos"].to_numpy(np.float64)
    if len(np.unique(lab[np.isfinite(lab)])) < 2:
        return None
    return np.where(np.isfinite(lab), lab, -1.0)


def _excess(pos: np.ndarray, m: np.ndarray, strata: np.ndarray | None) -> float:
    """Positive rate of the slice ``m`` minus the rest's: within each stratum that has both, averaged
    over the slice's tiles (plain difference without strata); NaN when nothing compares."""
    if strata is None:
        strata = np.zeros(len(pos))
    diff, weight = 0.0, 0
    for s in np.unique(strata[m]):
        a, b = m & (strata == s), ~m & (strata == s)
        if a.any() and b.any():
            diff += float(pos[a].mean() - pos[b].mean()) * int(a.sum())
            weight += int(a.sum())
    return diff / weight if weight else float("nan")


def _apart_words(tiles: pd.DataFrame, rules: FlagRules, *, at_most: int = 5) -> str:
    """ "; slides stained apart: a (H/E x2.10), ..." for the slide rule's slides ("" when none)."""
    apart = slide_stain_outliers(tiles, rules)
    if not len(apart):
        return ""
    named = ", ".join(f"{r.slide_id} (H/E x{r.ratio:.2f})" for r in apart.head(at_most).itertuples())
    more = f" and {len(apart) - at_most} more" if len(apart) > at_most else ""
    return f"; slides stained apart: {named}{more}"
