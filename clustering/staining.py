"""Staining outside the cohort's range, by tile and by slide.

Inked tiles are left out of both rules: their optical density is the marker's.

- **Tile rule**, on the tiling QC's staining strength (``h_p90``/``e_p90``: per-pixel 90th
  percentiles of the haematoxylin and eosin optical density along the slide's own vectors; the
  mean densities ``od_h``/``od_e`` without them): a tile whose H or E staining lies beyond the
  cohort's quartiles by more than ``stain_iqr`` interquartile ranges (Tukey's far-out values).
  Tissue types differ a lot in how much haematoxylin they hold (dense nuclei against pale
  stroma), so only gross outliers pass.
- **Slide rule**, on the H:E balance ``he_p10`` (10th percentile of the per-pixel ln(H/E) along
  fixed reference vectors: where the eosin-richest pixels sit, comparable across slides). A
  staining protocol is a property of a slide (or of its lab), not of a tile, and one tile's
  balance varies with its tissue (SD 0.45 over CMU-1's tiles, against a 0.6-0.85 shift for 1.8x
  haematoxylin) far more than a slide's median does. A slide is stained apart when its median
  balance is a robust outlier among the cohort's slides (modified z-score
  ``|x - median| / (1.4826 MAD)`` of at least ``stain_slide_z``, Iglewicz & Hoaglin's 3.5) and
  differs from the slides' median by at least a factor ``stain_slide_ratio`` in H/E (a practical
  size: a 10 % difference is within one lab's batches, not another protocol). Every tile
  of such a slide counts as stained outside the range. The rule needs ``stain_min_slides``
  slides; it finds a minority of slides stained apart, not two labs of equal size (the site probe
  and the confounder scan look at those).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["stain_columns", "tile_stain_outliers", "slide_stain_outliers", "stain_outliers"]


def stain_columns(df: pd.DataFrame) -> tuple[str, str] | None:
    """The (H, E) staining columns of the tile table (``h_p90``/``e_p90``, else ``od_h``/``od_e``), or None."""
    for cols in (("h_p90", "e_p90"), ("od_h", "od_e")):
        if set(cols) <= set(df.columns):
            return cols
    return None


def _clean(df: pd.DataFrame, rules) -> np.ndarray:
    return (df["ink_frac"] < rules.tile_ink).to_numpy() if "ink_frac" in df else np.ones(len(df), bool)


def tile_stain_outliers(df: pd.DataFrame, rules) -> np.ndarray | None:
    """(n,) bool: tiles stained beyond the cohort's quartiles by ``rules.stain_iqr`` IQR (None without the columns)."""
    cols = stain_columns(df)
    if cols is None:
        return None
    clean = _clean(df, rules)
    out = np.zeros(len(df), bool)
    for c in cols:
        v = np.where(clean, df[c].to_numpy(np.float64), np.nan)
        q1, q3 = np.nanpercentile(v, [25, 75]) if np.isfinite(v).any() else (np.nan, np.nan)
        iqr = q3 - q1
        with np.errstate(invalid="ignore"):
            out |= (v > q3 + rules.stain_iqr * iqr) | (v < q1 - rules.stain_iqr * iqr)
    return out


def slide_stain_outliers(df: pd.DataFrame, rules) -> pd.DataFrame:
    """The slides stained apart from the cohort (see the module docstring).

    Parameters
    ----------
    df : tile table with ``slide_id`` and ``he_p10``; not modified.
    rules : FlagRules (``stain_slide_z``, ``stain_slide_ratio``, ``stain_min_slides``, ``tile_ink``)

    Returns
    -------
    DataFrame, one row per slide stained apart: ``slide_id``, ``ratio`` (the slide's median H/E
    balance over the slides' median, as a factor on H/E), ``z`` (modified z-score). Empty with
    fewer than ``stain_min_slides`` slides with a balance, or without the column.
    """
    empty = pd.DataFrame(columns=["slide_id", "ratio", "z"])
    if "he_p10" not in df or "slide_id" not in df:
        return empty
    med = df.loc[_clean(df, rules)].groupby("slide_id")["he_p10"].median().dropna()
    if len(med) < rules.stain_min_slides:
        return empty
    centre = float(np.median(med))
    scale = 1.4826 * float(np.median(np.abs(med - centre)))
    z = (med - centre) / scale if scale > 0 else pd.Series(0.0, index=med.index)
    apart = (np.abs(z) >= rules.stain_slide_z) & (np.abs(med - centre) >= np.log(rules.stain_slide_ratio))
    out = pd.DataFrame({"slide_id": med.index, "ratio": np.exp(med - centre).to_numpy(), "z": z.to_numpy()})
    return out[apart.to_numpy()].reset_index(drop=True)


def stain_outliers(df: pd.DataFrame, rules) -> np.ndarray | None:
    """(n,) bool: tiles stained outside the cohort's range by the tile rule or the slide rule
    (inked tiles never); None without the staining columns."""
    out = tile_stain_outliers(df, rules)
    if out is None:
        return None
    apart = slide_stain_outliers(df, rules)
    if len(apart):
        out = out | (df["slide_id"].isin(set(apart["slide_id"])).to_numpy() & _clean(df, rules))
    return out
