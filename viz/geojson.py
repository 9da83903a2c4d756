"""GeoJSON export of tiles for QuPath.

Each tile becomes a square polygon in level-0 pixels with QuPath's ``objectType`` and a
``classification`` (name and colour), so QuPath imports the clusters as classified detections
(File > Import objects) and the same file reads back with :func:`tiling.read_geojson`.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["cluster_colours", "tiles_to_geojson", "write_geojson"]


def cluster_colours(clusters) -> dict[int, tuple[int, int, int]]:
    """A stable, well-spread RGB colour per cluster id (noise, -1, is grey)."""
    out = {}
    for c in sorted({int(c) for c in clusters}):
        if c < 0:
            out[c] = (160, 160, 160)
            continue
        h = (c * 0.618033988749895) % 1.0  # golden-ratio hue steps
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.9)
        out[c] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def tiles_to_geojson(
    tiles: pd.DataFrame,
    *,
    names: dict[int, str] | None = None,
    object_type: str = "detection",
    properties: tuple[str, ...] = ("prob_pos", "outlier_score", "membership", "pred"),
) -> dict:
    """A FeatureCollection of the tiles of one slide.

    Parameters
    ----------
    tiles : DataFrame with x, y, size0 (level-0 pixels), cluster, tile_id and the ``properties``
        columns that exist; not modified.
    names : dict cluster -> name (pathologists' names); default ``cluster <id>`` / ``noise``.
    object_type : QuPath object type ("detection" or "annotation").

    Returns
    -------
    dict (JSON-serialisable), each feature with ``objectType``, ``classification`` {name, color},
    ``cluster``, ``tile_id`` and the requested properties.
    """
    names = dict(names or {})
    colours = cluster_colours(tiles["cluster"]) if len(tiles) else {}
    feats = []
    x = tiles["x"].to_numpy(np.int64)
    y = tiles["y"].to_numpy(np.int64)
    s = tiles["size0"].to_numpy(np.int64)
    cl = tiles["cluster"].to_numpy(np.int64)
    present = [p for p in properties if p in tiles.columns]
    for i in range(len(tiles)):
        c = int(cl[i])
        name = names.get(c) or ("noise" if c < 0 else f"cluster {c}")
        x0, y0, x1, y1 = int(x[i]), int(y[i]), int(x[i] + s[i]), int(y[i] + s[i])
        props = {
            "objectType": object_type,
            "classification": {"name": name, "color": list(colours[c])},
            "cluster": c,
            "tile_id": int(tiles["tile_id"].iloc[i]),
        }
        for p in present:
            v = tiles[p].iloc[i]
            if isinstance(v, str):  # a text property (the cluster's verdict, say)
                props[p] = v
            else:
                props[p] = None if pd.isna(v) else (int(v) if isinstance(v, (np.integer, int)) else float(v))
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(doc: dict, path: str | Path) -> Path:
    """Write a GeoJSON document (UTF-8, compact) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)
    return path
