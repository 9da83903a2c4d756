"""Tissue detection: the planted blob is found; background, ink and blank slides are not tissue."""

from __future__ import annotations

import numpy as np
import pytest

import tiling
from tiling import ArrayReader, detect_tissue, tissue_mask_from_rgb
from tests.conftest import synthetic_he


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


def test_pen_ink_is_excluded():
    from wsi_explain.demo_data import draw_ink

    img, truth = synthetic_he(800, 800, seed=3, blob=(0.5, 0.5, 0.4, 0.4))
    inked = draw_ink(img, np.random.default_rng(0), n_strokes=2, width=30)
    ink_truth = (np.abs(inked.astype(int) - img.astype(int)).sum(2) > 60)
    tissue, ink = tissue_mask_from_rgb(inked, mpp=2.0, min_object_um2=500)
    # the stroke is recognised as ink and removed from the tissue
    assert ink[ink_truth].mean() > 0.9
    assert tissue[ink_truth].mean() < 0.05
    # without ink removal, inked tissue is counted as tissue
    tissue2, _ = tissue_mask_from_rgb(inked, mpp=2.0, min_object_um2=500, remove_ink=False)
    assert tissue2[ink_truth & truth].mean() > 0.5


def test_missing_mpp_is_a_clear_error(slides):
    with tiling.OpenSlideReader(slides["nompp"]) as r:
        with pytest.raises(tiling.MissingMppError, match="nompp.tif.*--mpp"):
            detect_tissue(r)


def test_min_object_size_in_um2():
    img = np.full((400, 400, 3), 245, np.uint8)
    img[10:20, 10:20] = (220, 140, 190)   # 10x10 px = 100 µm² at 1 µm/px
    img[100:300, 100:300] = (220, 140, 190)
    tissue, _ = tissue_mask_from_rgb(img, mpp=1.0, min_object_um2=1000)
    assert not tissue[10:20, 10:20].any()
    assert tissue[150:250, 150:250].all()
