"""Annotations: QuPath GeoJSON polygons and label masks become exact per-tile label fractions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import tiling
from tiling import geojson_label_fractions, mask_label_fractions, read_geojson


def _grid(n=4, size=100):
    xs, ys = np.meshgrid(np.arange(n) * size, np.arange(n) * size)
    return pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "size0": size})


def _feature(coords, name, kind="Polygon"):
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coords},
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}},
    }


def _write(tmp_path, doc, name="ann.geojson"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_polygon_overlap_is_exact(tmp_path):
    tiles = _grid()
    # Tumor: a square covering tile (0,0) fully and half of tile (1,0); a triangle over tile (3,3)
    tumor = [[[0, 0], [150, 0], [150, 100], [0, 100], [0, 0]]]
    tri = [[[300, 300], [400, 300], [300, 400], [300, 300]]]
    doc = {"type": "FeatureCollection", "features": [_feature(tumor, "Tumor"), _feature(tri, "Tumor")]}
    # Stroma: a multipolygon of two quarter-tiles
    multi = [
        [[[200, 200], [250, 200], [250, 250], [200, 250], [200, 200]]],
        [[[0, 300], [50, 300], [50, 350], [0, 350], [0, 300]]],
    ]
    doc["features"].append(_feature(multi, "Stroma", kind="MultiPolygon"))
    ann = read_geojson(_write(tmp_path, doc))
    assert ann.classes == ["Stroma", "Tumor"]
    fr = geojson_label_fractions(tiles, ann)
    assert list(fr.columns) == ["label_stroma", "label_tumor"]
    tumor_frac = fr["label_tumor"].to_numpy().reshape(4, 4)
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 1], expected[3, 3] = 1.0, 0.5, 0.5
    np.testing.assert_allclose(tumor_frac, expected, atol=1e-6)
    stroma = fr["label_stroma"].to_numpy().reshape(4, 4)
    expected = np.zeros((4, 4))
    expected[2, 2], expected[3, 0] = 0.25, 0.25
    np.testing.assert_allclose(stroma, expected, atol=1e-6)


def test_qupath_variants_and_overlapping_polygons(tmp_path):
    tiles = _grid(2)
    a = [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]
    b = [[[50, 0], [150, 0], [150, 100], [50, 100], [50, 0]]]  # overlaps a: the union counts once
    p = _write(tmp_path, [_feature(a, "Tumor"), _feature(b, "Tumor")])  # bare list, as QuPath may export
    fr = geojson_label_fractions(tiles, read_geojson(p))
    np.testing.assert_allclose(fr["label_tumor"].to_numpy(), [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    single = _write(tmp_path, {**_feature(a, "x"), "properties": {"name": "Gleason 4"}}, "single.geojson")
    assert read_geojson(single).classes == ["Gleason 4"]
    assert tiling.label_column("Gleason 4") == "label_gleason_4"


def test_bad_geojson_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(tiling.AnnotationError, match="bad.geojson.*not valid JSON"):
        read_geojson(bad)
    pts = _write(
        tmp_path,
        {
            "type": "FeatureCollection",
            "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}],
        },
        "pts.geojson",
    )
    with pytest.raises(tiling.AnnotationError, match="no polygon"):
        read_geojson(pts)
    with pytest.raises(tiling.AnnotationError, match="does not exist"):
        read_geojson(tmp_path / "nope.geojson")


def test_label_mask_fractions_exact(tmp_path):
    from PIL import Image

    tiles = _grid(4, size=100)  # slide 400x400 level-0 px
    mask = np.zeros((100, 100), np.uint8)  # downsample 4
    mask[0:25, 0:25] = 3  # tile (0,0) fully gleason3
    mask[25:50, 25:38] = 4  # tile (1,1): 13 of 25 columns
    mask[75:100, 75:100] = 1
    before = mask.copy()
    p = tmp_path / "mask.png"
    Image.fromarray(np.dstack([mask, mask * 0, mask * 0])).save(p)  # RGB: label in red, as PANDA
    m = tiling.read_label_mask(p)
    np.testing.assert_array_equal(m, mask)
    fr = mask_label_fractions(tiles, m, slide_dimensions=(400, 400), classes=tiling.PANDA_RADBOUD)
    assert "label_gleason3" in fr and "label_stroma" in fr
    g3 = fr["label_gleason3"].to_numpy().reshape(4, 4)
    assert g3[0, 0] == 1.0 and g3.sum() == 1.0
    g4 = fr["label_gleason4"].to_numpy().reshape(4, 4)
    assert g4[1, 1] == pytest.approx(13 / 25)
    total = sum(fr[c].to_numpy() for c in fr.columns)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    np.testing.assert_array_equal(mask, before)


def test_label_mask_from_pyramidal_tiff(tmp_path):
    mask = np.zeros((512, 512), np.uint8)
    mask[:256] = 2
    rgb = np.dstack([mask, mask, mask])
    p = tiling.write_pyramidal_tiff(tmp_path / "mask.tif", rgb, mpp=0.5, compression="deflate", min_level_size=128)
    m = tiling.read_label_mask(p)
    tiles = _grid(2, size=512)  # slide of 1024x1024: mask at downsample 2
    fr = mask_label_fractions(tiles, m, slide_dimensions=(1024, 1024), classes=tiling.PANDA_KAROLINSKA)
    np.testing.assert_allclose(fr["label_cancer"], [1, 1, 0, 0])


def test_label_mask_aspect_mismatch(tmp_path):
    with pytest.raises(tiling.AnnotationError, match="aspect ratio"):
        mask_label_fractions(_grid(), np.zeros((100, 50), int), slide_dimensions=(400, 400), path="m.png")


def test_per_pixel_tile_masks_match_the_fractions(tmp_path):
    """The per-pixel masks (used by localisation metrics) average to the exact area fractions."""
    tiles = _grid()
    tumor = [[[0, 0], [150, 0], [150, 100], [0, 100], [0, 0]]]
    ann = read_geojson(_write(tmp_path, [_feature(tumor, "Tumor")]))
    masks = tiling.geojson_tile_masks(tiles, ann, px=20)
    assert masks["Tumor"].shape == (16, 20, 20) and masks["Tumor"].dtype == bool
    np.testing.assert_allclose(
        masks["Tumor"].mean((1, 2)), geojson_label_fractions(tiles, ann)["label_tumor"], atol=1e-6
    )
    assert masks["Tumor"][1][:, :10].all() and not masks["Tumor"][1][:, 10:].any()  # left half of tile (1, 0)
    lab = np.zeros((40, 40), np.int32)  # a label mask at downsample 10
    lab[:10, :15] = 4
    per_px = tiling.mask_tile_labels(tiles, lab, slide_dimensions=(400, 400), px=10)
    np.testing.assert_allclose(
        (per_px == 4).mean((1, 2)), mask_label_fractions(tiles, lab, slide_dimensions=(400, 400))["label_class_4"]
    )
