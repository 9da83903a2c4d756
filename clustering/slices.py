"""Artefact slices: the cohort's artefact tiles by kind, wherever the clustering put them.

A cluster flag needs the artefact tiles to form a cluster of their own; when the embedding places
them among clean tissue (a stain shift the features barely see, say), no cluster flag can find
them although the model leans on them. A slice is every tile that shows one artefact by the same
tile-level rules the cluster flags use (:class:`clustering.FlagRules`): pen ink (ink fraction of
``tile_ink`` or more), out of focus (sharpness below ``sharpness``), stained outside the cohort's
range (H or E staining strength beyond ``stain_iqr`` IQR of the quartiles) and little tissue
(tissue fraction below ``low_tissue``). A slice is flagged when it has at least ``min_size`` tiles
and the model leans on it: its positive rate is at least ``positive_rate`` and ``positive_excess``
above the rest of the cohort's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .summary import FlagRules, _stain_outliers

__all__ = ["SLICE_COLUMNS", "artefact_masks", "artefact_slices"]

SLICE_COLUMNS = ["kind", "n_tiles", "n_slides", "positive_rate", "rest_positive_rate", "flagged", "reason"]

_WORDS = {
    "ink": "tiles with pen ink",
    "blur": "out-of-focus tiles",
    "stain": "tiles stained outside the cohort's range",
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
    stain = _stain_outliers(tiles.reset_index(drop=True), rules)
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
    rows = []
    for kind, m in artefact_masks(tiles, rules).items():
        n = int(m.sum())
        rate = float(pos[m].mean()) if n else float("nan")
        rest = float(pos[~m].mean()) if (~m).any() else float("nan")
        leans = n >= rules.min_size and rate >= rules.positive_rate and rate - rest >= rules.positive_excess
        reason = (
            f"the model leans on the {_WORDS[kind]} wherever they are: {n} tiles on {len(set(slides[m]))} slides, "
            f"{100 * rate:.0f}% predicted {positive_name} (the other tiles: {100 * rest:.0f}%)"
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
                "flagged": bool(leans),
                "reason": reason,
            }
        )
    return pd.DataFrame(rows, columns=SLICE_COLUMNS)
