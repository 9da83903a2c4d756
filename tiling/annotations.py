"""Annotations turned into per-tile label fractions.

Two sources: GeoJSON as QuPath exports it (polygons and multipolygons with a classification
name, level-0 pixel coordinates) and label-mask images (one class index per pixel, at any
downsample of level 0, as in the PANDA prostate data set).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import AnnotationError
from .grid import tile_boxes

__all__ = [
    "Annotations",
    "read_geojson",
    "geojson_label_fractions",
    "read_label_mask",
    "mask_label_fractions",
    "PANDA_RADBOUD",
    "PANDA_KAROLINSKA",
    "label_column",
    "geojson_tile_masks",
    "mask_tile_labels",
]

#: PANDA label conventions (class index -> name).
PANDA_RADBOUD = {0: "background", 1: "stroma", 2: "benign", 3: "gleason3", 4: "gleason4", 5: "gleason5"}
PANDA_KAROLINSKA = {0: "background", 1: "benign", 2: "cancer"}


def label_column(name: str) -> str:
    """Column name of a class in the tile table: ``label_<name>`` with unsafe characters replaced."""
    return "label_" + re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_").lower()


@dataclass(frozen=True)
class Annotations:
    """Polygons grouped by class name, in level-0 pixels.

    Attributes
    ----------
    path : str
    geometries : dict of str -> shapely geometry (the union of that class's polygons)
    """

    path: str
    geometries: dict

    @property
    def classes(self) -> list[str]:
        return sorted(self.geometries)


def _features(doc: object, path: Path) -> list[dict]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        if doc.get("type") == "FeatureCollection":
            return list(doc.get("features", []))
        if doc.get("type") == "Feature":
            return [doc]
        if doc.get("type") in ("Polygon", "MultiPolygon"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise AnnotationError(path, "not a GeoJSON FeatureCollection, Feature or list of features")


def _class_name(props: dict) -> str:
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str) and cls:
        return cls
    for key in ("class", "label", "name"):
        if props.get(key):
            return str(props[key])
    return "annotation"


def read_geojson(path: str | Path) -> Annotations:
    """Read a QuPath GeoJSON export.

    Polygons and multipolygons are kept (points and lines are ignored); each is grouped by
    ``properties.classification.name`` (falling back to ``class``/``label``/``name``, else
    ``"annotation"``). Invalid polygons are repaired with ``make_valid``. A file with no feature
    at all (QuPath's export of a slide with nothing annotated is an empty FeatureCollection) means
    "no annotated area": the result has no classes and the slide's label fractions are 0.

    Raises
    ------
    AnnotationError
        Unreadable JSON, JSON that is not GeoJSON, or features none of which is a polygon.
    """
    import shapely
    from shapely.geometry import shape

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AnnotationError(path, "annotation file does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"not valid JSON ({exc})") from exc
    groups: dict[str, list] = {}
    features = _features(doc, path)
    for i, feat in enumerate(features):
        geom = (feat or {}).get("geometry")
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        try:
            g = shape(geom)
        except Exception as exc:
            raise AnnotationError(path, f"feature {i} has an invalid geometry ({exc})") from exc
        if not g.is_valid:
            g = shapely.make_valid(g)
        groups.setdefault(_class_name(feat.get("properties") or {}), []).append(g)
    if not groups and features:
        raise AnnotationError(
            path,
            f"its {len(features)} feature(s) include no polygon or multipolygon (points and "
            "lines are not areas); export annotations, or an empty FeatureCollection for none",
        )
    return Annotations(str(path), {k: shapely.union_all(v) for k, v in groups.items()})


def geojson_label_fractions(tiles: pd.DataFrame, annotations: Annotations) -> pd.DataFrame:
    """Exact fraction of each tile's area covered by each class (polygon intersection).

    Parameters
    ----------
    tiles : DataFrame with x, y, size0 (level-0 pixels)
    annotations : Annotations

    Returns
    -------
    DataFrame aligned with ``tiles``: one float32 column ``label_<class>`` per class, in [0, 1].
    """
    import shapely

    b = tile_boxes(tiles)
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    out = {}
    for name in annotations.classes:
        geom = annotations.geometries[name]
        shapely.prepare(geom)
        hit = shapely.intersects(boxes, geom)
        frac = np.zeros(len(tiles), np.float64)
        if hit.any():
            frac[hit] = shapely.area(shapely.intersection(boxes[hit], geom)) / area[hit]
        out[label_column(name)] = np.clip(frac, 0, 1).astype(np.float32)
    return pd.DataFrame(out, index=tiles.index)


def read_label_mask(path: str | Path, *, max_pixels: int = 64_000_000) -> np.ndarray:
    """Read a label mask as an (h, w) integer array of class indices.

    Pyramidal masks (PANDA's TIFFs) are read with OpenSlide at the finest level with at most
    ``max_pixels`` pixels; plain PNG/TIFF with Pillow/tifffile. RGB masks use the red channel
    (PANDA's convention).
    """
    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, "label mask does not exist")
    arr = None
    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        try:
            import openslide

            with openslide.OpenSlide(str(path)) as s:
                level = s.level_count - 1
                for i, (w, h) in enumerate(s.level_dimensions):
                    if w * h <= max_pixels:
                        level = i
                        break
                if s.level_count > 1 or s.dimensions[0] * s.dimensions[1] <= max_pixels:
                    w, h = s.level_dimensions[level]
                    arr = np.asarray(s.read_region((0, 0), level, (w, h)))[..., 0]
        except Exception:
            arr = None
        if arr is None:
            try:
                import tifffile

                arr = tifffile.imread(path)
            except Exception as exc:
                raise AnnotationError(path, f"cannot read label mask ({exc})") from exc
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise AnnotationError(path, f"cannot read label mask ({exc})") from exc
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise AnnotationError(path, f"expected a 2-D label image, got shape {arr.shape}")
    return arr.astype(np.int32)


def mask_label_fractions(
    tiles: pd.DataFrame,
    mask: np.ndarray,
    *,
    slide_dimensions: tuple[int, int],
    classes: dict[int, str] | None = None,
    path: str = "<mask>",
) -> pd.DataFrame:
    """Fraction of each tile's footprint in each class of a label mask.

    Parameters
    ----------
    tiles : DataFrame with x, y, size0 (level-0 pixels)
    mask : (h, w) int
        Class index per pixel, covering the whole slide at a downsample of level 0
        (``slide_width / w``); not modified.
    slide_dimensions : (W, H)
        Level-0 size of the slide.
    classes : dict of int -> str, optional
        Names of the class indices (default ``class_<i>``). Indices absent from it are ignored.

    Returns
    -------
    DataFrame aligned with ``tiles`` with one float32 column ``label_<name>`` per class.
    """
    W, H = slide_dimensions
    h, w = mask.shape
    sx, sy = W / w, H / h
    if abs(sx - sy) / max(sx, sy) > 0.02:
        raise AnnotationError(
            path, f"mask {w}x{h} does not have the slide's aspect ratio ({W}x{H}); is it the right mask?"
        )
    if classes is None:
        classes = {int(i): f"class_{int(i)}" for i in np.unique(mask)}
    b = tile_boxes(tiles)
    x0 = np.clip(np.floor(b[:, 0] / sx).astype(np.int64), 0, w)
    x1 = np.clip(np.ceil(b[:, 2] / sx).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(b[:, 1] / sy).astype(np.int64), 0, h)
    y1 = np.clip(np.ceil(b[:, 3] / sy).astype(np.int64), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    out = {}
    for idx, name in classes.items():
        m = (mask == idx).astype(np.int32)
        sat = np.zeros((h + 1, w + 1), np.int64)
        sat[1:, 1:] = m.cumsum(0).cumsum(1)
        total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        out[label_column(name)] = (total / area).astype(np.float32)
    return pd.DataFrame(out, index=tiles.index)


def _pixel_centres(tiles: pd.DataFrame, px: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 coordinates (n, px, px) of the centres of a px x px grid over each tile."""
    b = tile_boxes(tiles)
    f = (np.arange(px) + 0.5) / px
    xs = b[:, 0, None] + f[None] * (b[:, 2] - b[:, 0])[:, None]
    ys = b[:, 1, None] + f[None] * (b[:, 3] - b[:, 1])[:, None]
    return np.broadcast_to(xs[:, None, :], (len(b), px, px)), np.broadcast_to(ys[:, :, None], (len(b), px, px))


def geojson_tile_masks(tiles: pd.DataFrame, annotations: Annotations, *, px: int) -> dict[str, np.ndarray]:
    """Per-pixel class masks of tiles from GeoJSON polygons (pixel centres tested for inclusion).

    Parameters
    ----------
    tiles : DataFrame with x, y, size0 (level-0 pixels), m rows
    annotations : Annotations
    px : int
        Mask edge in pixels (e.g. the tile's ``tile_px``, or a map's resolution).

    Returns
    -------
    dict class name -> (m, px, px) bool.
    """
    import shapely

    xs, ys = _pixel_centres(tiles, px)
    out = {}
    for name in annotations.classes:
        geom = annotations.geometries[name]
        shapely.prepare(geom)
        out[name] = shapely.contains_xy(geom, xs.ravel(), ys.ravel()).reshape(xs.shape)
    return out


def mask_tile_labels(
    tiles: pd.DataFrame, mask: np.ndarray, *, slide_dimensions: tuple[int, int], px: int
) -> np.ndarray:
    """Class index at each pixel of a px x px grid over each tile, from a label mask covering the
    slide at any downsample (nearest pixel). Returns (m, px, px) of the mask's dtype."""
    W, H = slide_dimensions
    h, w = mask.shape
    xs, ys = _pixel_centres(tiles, px)
    xi = np.clip((xs * w / W).astype(np.int64), 0, w - 1)
    yi = np.clip((ys * h / H).astype(np.int64), 0, h - 1)
    return mask[yi, xi]
