"""What the explorer shows, shared by the cohort report and the explorer server: the colour menu
and the cluster table's columns (with the scored run's metrics beside each cluster)."""

from __future__ import annotations

import pandas as pd

__all__ = ["colour_options", "cluster_table", "with_errors", "with_mil"]

#: menu label -> tile column, offered when the column exists and has values
_OPTIONAL = (
    ("label", "label_pos"),
    ("error (label vs prediction)", "error"),
    ("slide label", "label"),
    ("site", "site"),
    ("uncertainty (ensemble spread)", "ensemble_std"),
    ("uncertainty (predictive entropy)", "entropy"),
    ("outlier score", "outlier_score"),
    ("attribution off tissue", "cam_off_tissue"),
    ("pen ink", "ink_frac"),
    ("sharpness", "sharpness"),
    ("haematoxylin OD", "od_h"),
    ("eosin OD", "od_e"),
    ("H staining strength (p90)", "h_p90"),
    ("E staining strength (p90)", "e_p90"),
    ("H:E balance (p10 of ln H/E)", "he_p10"),
    ("brightness", "brightness"),
    ("MIL attention (1 = uniform)", "mil_attention"),
    ("MIL relevance (Integrated Gradients)", "mil_ig"),
    ("MIL relevance (gradient x input)", "mil_grad_x_input"),
)


def with_mil(tiles: pd.DataFrame, run_path) -> pd.DataFrame:
    """The tiles with the MIL head's per-tile attention and relevance (``cohort/mil_tiles.parquet``
    of ``wsi-explain mil``), when the run has them; the input is not modified."""
    from pathlib import Path

    p = Path(run_path) / "cohort" / "mil_tiles.parquet"
    if not p.exists():
        return tiles
    mil = pd.read_parquet(p)
    keep = [c for c in mil.columns if c.startswith("mil_") and c not in tiles.columns]
    return tiles.merge(mil[["slide_id", "tile_id", *keep]], on=["slide_id", "tile_id"], how="left")


def with_errors(tiles: pd.DataFrame, *, threshold: float = 0.5) -> pd.DataFrame:
    """The tiles with an ``error`` column: "false positive", "false negative" or "right" where a
    tile has a label (``label_pos``; positive probability called at ``threshold``), "unlabelled"
    elsewhere; the input is not modified, and returned as it is without labels."""
    if "label_pos" not in tiles.columns or "prob_pos" not in tiles.columns or not tiles["label_pos"].notna().any():
        return tiles
    y, pred = tiles["label_pos"], tiles["prob_pos"] >= threshold
    err = pd.Series("right", index=tiles.index, dtype=object)
    err[pred & (y == 0)] = "false positive"
    err[~pred & (y == 1)] = "false negative"
    return tiles.assign(error=err.where(y.notna(), "unlabelled"))


def colour_options(tiles: pd.DataFrame, *, metric_columns=()) -> dict[str, str]:
    """Colour menu (label -> tiles column): cluster, prediction, probability, slide, the optional
    columns that have values, and the given per-tile metric columns that have values."""
    opts = {"cluster": "cluster", "prediction": "pred", "probability": "prob_pos", "slide": "slide_id"}
    for label, col in _OPTIONAL:
        if col in tiles.columns and tiles[col].notna().any():
            opts[label] = col
    for col in metric_columns:
        if col in tiles.columns and tiles[col].notna().any():
            opts[col] = col
    return opts


def cluster_table(clusters: pd.DataFrame, metrics: pd.DataFrame | None, keys) -> tuple[pd.DataFrame, dict[str, str]]:
    """The cluster table: size, slides, positive rate, confidence, flags, then one column per
    ``(method, metric, title)`` of ``keys`` found in ``metrics`` (cluster_metrics.parquet).

    Returns the clusters with the added columns (input not modified) and title -> column.
    """
    out = clusters.assign(flags_text=[", ".join(f) for f in clusters["flags"]])
    columns = {
        "tiles": "size",
        "slides": "n_slides",
        "positive rate": "positive_rate",
        "confidence": "mean_confidence",
        "flags": "flags_text",
    }
    if metrics is not None:
        for method, metric, title in keys:
            sub = metrics[(metrics.method == method) & (metrics.metric == metric)].set_index("cluster")["value"]
            if len(sub):
                out[metric] = out["cluster"].map(sub)
                columns[title] = metric
    return out, columns
