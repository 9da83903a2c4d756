"""Tissue detection: the planted blob is found; background, ink and blank slides are not tissue."""

from __future__ import annotations

import numpy as np
import pytest

import tiling
from tests.conftest import synthetic_he
from tiling import ArrayReader, detect_tissue, tissue_mask_from_rgb


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_blob_is_found(he_image):
    img, truth = he_image
    r = ArrayReader(img, mpp=0.5, downsamples=(1, 4, 16))
    before = img.copy()
    tm = detect_tissue(r, target_mpp=8.0)
    assert tm.mpp == pytest.approx(8.0)
    assert tm.scale == 16
    small_truth = truth[8::16, 8::16]
    assert _iou(tm.mask, small_truth[: tm.mask.shape[0], : tm.mask.shape[1]]) > 0.9
    np.testing.assert_array_equal(img, before)


def test_coarse_level_is_block_reduced(he_image):
    img, _ = he_image
    r = ArrayReader(img, mpp=0.5, downsamples=(1, 2))
    tm = detect_tissue(r, target_mpp=16.0)
    assert tm.scale == 32 and tm.mpp == pytest.approx(16.0)
    assert tm.mask.shape == (1024 // 32, 1536 // 32)


def test_blank_and_black_are_not_tissue():
    white = np.full((512, 512, 3), 246, np.uint8)
    with pytest.raises(tiling.NoTissueError, match="blank.*no tissue"):
        detect_tissue(ArrayReader(white, mpp=1.0, name="blank"))
    black = np.zeros((512, 512, 3), np.uint8)
    black[:, :256] = 246
    with pytest.raises(tiling.NoTissueError):
        detect_tissue(ArrayReader(black, mpp=1.0, name="black"))


def test_pen_ink_is_found_and_inked_tissue_stays():
    img, truth = synthetic_he(800, 800, seed=3, blob=(0.5, 0.5, 0.4, 0.4))
    strokes = tiling.random_strokes(
        np.random.default_rng(0), img.shape[:2], mpp=2.0, n=2, width_mm=(0.3, 0.4), length_mm=(1.0, 1.2)
    )
    inked = tiling.render_strokes(img, strokes)
    ink_truth = tiling.stroke_coverage([s.polygon for s in strokes], img.shape[:2]) > 0.99
    tm = tissue_mask_from_rgb(inked, mpp=2.0, min_object_um2=500)
    assert tm.ink[ink_truth].mean() > 0.9 and tm.ink[~ink_truth].mean() < 0.01
    # tissue under the ink is tissue; ink on glass is not
    assert tm.mask[ink_truth & truth].mean() > 0.9
    assert tm.mask[ink_truth & ~truth].mean() < 0.1
    # without ink detection nothing is called ink
    assert not tissue_mask_from_rgb(inked, mpp=2.0, min_object_um2=500, find_ink=False).ink.any()


def test_missing_mpp_is_a_clear_error(slides):
    with tiling.OpenSlideReader(slides["nompp"]) as r:
        with pytest.raises(tiling.MissingMppError, match="nompp.tif.*--mpp"):
            detect_tissue(r)


def test_min_object_size_in_um2():
    img = np.full((400, 400, 3), 245, np.uint8)
    img[10:20, 10:20] = (220, 140, 190)  # 10x10 px = 100 µm² at 1 µm/px
    img[100:300, 100:300] = (220, 140, 190)
    tissue = tissue_mask_from_rgb(img, mpp=1.0, min_object_um2=1000).mask
    assert not tissue[10:20, 10:20].any()
    assert tissue[150:250, 150:250].all()
