"""Colour columns for Bokeh glyphs: categorical (clusters, slides, labels) and continuous
(probabilities, scores) values turned into hex strings, so one JS line can switch colourings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .geojson import cluster_colours

__all__ = ["hex_colour", "categorical_colours", "continuous_colours", "colour_column", "VIRIDIS"]

#: 256-step perceptually uniform palette (Bokeh's Viridis256)
VIRIDIS: tuple[str, ...]
try:  # bokeh is a runtime dependency; keep the import local to this constant
    from bokeh.palettes import Viridis256 as _V

    VIRIDIS = tuple(_V)
except ImportError:  # pragma: no cover - bokeh is installed with the package
    VIRIDIS = ("#440154", "#21918c", "#fde725")


def hex_colour(rgb) -> str:
    r, g, b = (int(v) for v in rgb[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def categorical_colours(values) -> tuple[np.ndarray, dict]:
    """Hex colour per value of a categorical column (clusters: the export's colours; others:
    golden-ratio hues per sorted category). Returns (colours (n,) object, legend {value: hex})."""
    s = pd.Series(values)
    if pd.api.types.is_integer_dtype(s):
        cmap = {k: hex_colour(v) for k, v in cluster_colours(s.unique()).items()}
    else:
        s = s.astype(object).where(s.notna(), "n/a").astype(str)  # missing values are one category
        cats = sorted(s.unique())
        cmap = {c: hex_colour(v) for c, v in zip(cats, cluster_colours(range(len(cats))).values())}
    return s.map(cmap).fillna("#a0a0a0").to_numpy(object), cmap


def continuous_colours(
    values, *, lo: float | None = None, hi: float | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Viridis hex colour per value (NaN grey), scaled to [lo, hi] (default: the 1st and 99th
    percentiles). Returns (colours (n,) object, (lo, hi))."""
    v = np.asarray(values, np.float64)
    fin = v[np.isfinite(v)]
    if lo is None:
        lo = float(np.percentile(fin, 1)) if len(fin) else 0.0
    if hi is None:
        hi = float(np.percentile(fin, 99)) if len(fin) else 1.0
    if hi <= lo:
        hi = lo + 1e-9
    idx = np.clip(((v - lo) / (hi - lo) * 255).round(), 0, 255)
    pal = np.asarray(VIRIDIS, object)
    out = np.where(np.isfinite(v), pal[np.nan_to_num(idx).astype(int)], "#a0a0a0")
    return out.astype(object), (lo, hi)


def colour_column(values) -> np.ndarray:
    """Categorical colours for integer/string/bool columns, continuous for floats."""
    s = pd.Series(values)
    if pd.api.types.is_float_dtype(s) and s.nunique(dropna=True) > 12:
        return continuous_colours(s.to_numpy())[0]
    if pd.api.types.is_float_dtype(s):
        s = s.map(lambda v: "n/a" if pd.isna(v) else f"{v:g}")
    return categorical_colours(s)[0]
