"""viz building blocks without a browser: overlays, stitched heatmaps, colours, escaping."""

from __future__ import annotations

import numpy as np
import pandas as pd

import viz


def test_overlays_keep_inputs_and_shapes():
    tile = np.full((32, 32, 3), 200, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0
    t0, c0 = tile.copy(), cam.copy()
    out = viz.cam_overlay(tile, cam)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert np.array_equal(tile, t0) and np.array_equal(cam, c0)
    # the hot corner is red-ish, the cold one blue-ish
    assert out[0, 0, 0] > out[0, 0, 2] and out[-1, -1, 2] > out[-1, -1, 0]
    strip = viz.tile_strip(tile, {"a": cam, "b": cam}, size=16)
    assert strip.shape == (16, 48, 3)
    assert viz.to_png(strip)[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(viz.jet(np.array([0.0, 1.0])), [[0, 0, 127], [127, 0, 0]])


def test_stitched_heatmap_fills_each_tile_footprint_only():
    overview = np.full((20, 30, 3), 240, np.uint8)
    boxes = np.array([[0, 0, 40, 40], [80, 40, 120, 80]], np.float64)  # level-0, scale 4 -> 10x10 px cells
    maps = np.stack([np.full((2, 2), 5.0), np.zeros((2, 2))]).astype(np.float32)
    out = viz.stitch_heatmap(overview, 4.0, boxes, maps)
    assert out.shape == overview.shape
    assert (out[:10, :10] != 240).any() and (out[10:20, 20:30] != 240).any()  # both tiles drawn
    assert (out[:10, 12:18] == 240).all() and (out[15:, :15] == 240).all()  # nothing outside them
    assert out[5, 5, 0] > out[15, 25, 0]  # the hot tile is redder than the cold one


def test_colour_columns():
    cats = viz.colour_column(np.array([0, 1, 1, -1]))
    assert cats[1] == cats[2] != cats[0] and cats[3] == "#a0a0a0"
    cont, (lo, hi) = viz.continuous_colours(np.linspace(0, 1, 50), lo=0, hi=1)
    from viz.colours import VIRIDIS

    assert (lo, hi) == (0, 1) and cont[0] == VIRIDIS[0] and cont[-1] == VIRIDIS[-1] and len(VIRIDIS) == 256
    assert len(set(viz.colour_column(np.linspace(0, 1, 50)))) > 20  # continuous for many floats
    assert viz.colour_column(pd.Series(["<b>", "a"])).shape == (2,)


def test_escape_and_tables():
    assert viz.escape('<script>"x"</script>') == "&lt;script&gt;&quot;x&quot;&lt;/script&gt;"
    html = viz.table_html(pd.DataFrame({"name": ["<img src=x onerror=alert(1)>"], "v": [0.5]}))
    assert "<img" not in html and "&lt;img" in html and "0.5" in html
    assert "<" not in viz.js_string({"a": "</script><script>"}).replace("\\u003c", "")
