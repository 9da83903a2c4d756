"""The mpp-aware grid: frames, pyramid levels, overlap, ROI, validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import tiling
from tiling import ArrayReader, GridSpec, OpenSlideReader, detect_tissue, make_grid, read_tile


@pytest.fixture(scope="module")
def tiff_grid(slides):
    r = OpenSlideReader(slides["tiff"])
    tissue = detect_tissue(r)
    yield r, tissue
    r.close()


def test_grid_frames_at_target_mpp(tiff_grid):
    r, tissue = tiff_grid  # level-0 0.25 µm/px, levels 1, 2, 4, 8...
    g = make_grid(r, tissue, GridSpec(tile_px=224, mpp=0.5, min_tissue=0.5))
    assert list(g.columns) == list(tiling.TILE_COLUMNS)
    assert len(g) >= 15
    assert (g["size0"] == 448).all()  # 224 px at 0.5 µm = 448 level-0 px at 0.25 µm
    assert (g["level"] == 1).all()  # level 1 is exactly 0.5 µm/px
    assert (g["read_w"] == 224).all() and (g["read_h"] == 224).all()
    assert (g["x"] % 448 == 0).all() and (g["y"] % 448 == 0).all()
    assert (g["tissue_frac"] >= 0.5).all()
    assert g["tile_id"].tolist() == list(range(len(g)))
    assert (g["mpp"] == 0.5).all()


def test_level_choice_and_resize(tiff_grid):
    r, tissue = tiff_grid
    g = make_grid(r, tissue, GridSpec(tile_px=128, mpp=1.5))  # between levels 2 (1.0) and 3 (2.0)
    assert (g["level"] == 2).all()
    assert (g["size0"] == 768).all() and (g["read_w"] == 192).all()
    tile = read_tile(r, g.iloc[len(g) // 2])
    assert tile.shape == (128, 128, 3)


def test_level_k_equals_level0_downsampled(tiff_grid):
    """Reading a tile at level k and at level 0 then downsampling agree (JPEG tolerance)."""
    from skimage.transform import downscale_local_mean

    r, tissue = tiff_grid
    g = make_grid(r, tissue, GridSpec(tile_px=256, mpp=1.0))
    assert (g["level"] == 2).all()
    for _, row in g.iloc[:: max(len(g) // 5, 1)].iterrows():
        at_k = read_tile(r, row).astype(np.float64)
        full = r.read_region((int(row.x), int(row.y)), 0, (int(row.size0), int(row.size0)))
        down = downscale_local_mean(full.astype(np.float64), (4, 4, 1))
        diff = np.abs(at_k - down)
        assert diff.mean() < 4.0, diff.mean()
        assert np.percentile(diff, 99) < 25


def test_overlap_and_min_tissue(tiff_grid):
    r, tissue = tiff_grid
    g0 = make_grid(r, tissue, GridSpec(tile_px=224, mpp=0.5, min_tissue=0.0))
    g1 = make_grid(r, tissue, GridSpec(tile_px=224, mpp=0.5, overlap=112, min_tissue=0.0))
    xs = np.sort(g1["x"].unique())
    assert np.diff(xs).min() == 224  # stride (224 - 112) px at 0.5 µm = 224 level-0 px
    assert len(g1) > 3 * len(g0)
    # min_tissue=0 keeps every grid position: floor((4096-448)/448)+1 by floor((3072-448)/448)+1
    assert len(g0) == 9 * 6
    g_all = make_grid(r, tissue, GridSpec(tile_px=224, mpp=0.5, min_tissue=1.0))
    assert (g_all["tissue_frac"] == 1.0).all() and len(g_all) < len(g0)


def test_roi_limits_the_grid(tiff_grid):
    r, tissue = tiff_grid
    roi = (1000, 1000, 1500, 1000)
    g = make_grid(r, tissue, GridSpec(tile_px=224, mpp=0.5, min_tissue=0.0, roi=roi))
    assert len(g) == 3 * 2
    assert (g["x"] >= 1000).all() and (g["x"] + g["size0"] <= 2500).all()
    assert (g["y"] >= 1000).all() and (g["y"] + g["size0"] <= 2000).all()


def test_magnification_convention():
    assert GridSpec(magnification=20).mpp == pytest.approx(0.5)
    assert GridSpec(magnification=40, mpp=None).mpp == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tile_px": 0}, "tile_px"),
        ({"tile_px": 100000}, "tile_px"),
        ({"mpp": 0.0}, "mpp"),
        ({"mpp": 1e6}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"overlap": 224}, "overlap"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"roi": (0, 0, 0, 10)}, "roi"),
        ({"mpp": None}, "mpp or a magnification"),
    ],
)
def test_gridspec_rejects_absurd_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridSpec(**kwargs)


def test_slide_smaller_than_a_tile():
    img = np.full((100, 100, 3), (220, 140, 190), np.uint8)
    r = ArrayReader(img, mpp=0.5, name="tiny")
    tissue = detect_tissue(r, min_object_um2=0)
    with pytest.raises(tiling.GridError, match="tiny.*smaller than one tile"):
        make_grid(r, tissue, GridSpec(tile_px=224, mpp=0.5))


def test_tissue_fraction_matches_mask(he_image):
    img, truth = he_image
    r = ArrayReader(img, mpp=0.5, downsamples=(1, 4))
    tissue = detect_tissue(r, target_mpp=2.0)
    g = make_grid(r, tissue, GridSpec(tile_px=128, mpp=0.5, min_tissue=0.0))
    true_frac = np.array([truth[y : y + 128, x : x + 128].mean() for x, y in zip(g.x, g.y)])
    assert np.abs(g["tissue_frac"].to_numpy() - true_frac).mean() < 0.03


def test_grid_does_not_mutate_inputs(tiff_grid):
    r, tissue = tiff_grid
    m = tissue.mask.copy()
    make_grid(r, tissue, GridSpec())
    np.testing.assert_array_equal(m, tissue.mask)
    boxes = tiling.tile_boxes(pd.DataFrame({"x": [1, 10], "y": [2, 20], "size0": [3, 5]}))
    np.testing.assert_array_equal(boxes, [[1, 2, 4, 5], [10, 20, 15, 25]])
    assert boxes.dtype == np.float64
