"""Slide readers on real pyramidal files written by tifffile, and on arrays."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest

import tiling
from tiling import ArrayReader, OpenSlideReader, open_slide


def test_generic_tiff_levels_and_mpp(slides):
    r = OpenSlideReader(slides["tiff"])
    info = r.info
    assert info.vendor == "generic-tiff"
    assert info.dimensions == (4096, 3072)
    assert info.level_count >= 3
    assert info.level_downsamples[:3] == (1.0, 2.0, 4.0)
    assert info.mpp == pytest.approx(0.25, rel=1e-3)
    assert info.level_mpp(2) == pytest.approx(1.0, rel=1e-3)
    r.close()


def test_svs_vendor_mpp_objective(slides):
    with OpenSlideReader(slides["svs"]) as r:
        assert r.info.vendor == "aperio"
        assert r.info.mpp == pytest.approx(0.5, rel=1e-3)
        assert r.info.objective_power == 20
        assert r.info.level_downsamples[1] == pytest.approx(4.0)
        assert r.associated_images() == {}  # the generated SVS carries no label or macro image


def test_read_region_outside_slide_is_white(slides):
    with OpenSlideReader(slides["tiff"]) as r:
        img = r.read_region((4096 - 10, 0), 0, (32, 8))
        assert img.shape == (8, 32, 3) and img.dtype == np.uint8
        assert (img[:, 12:] == 255).all()


def test_mpp_override(slides):
    with OpenSlideReader(slides["tiff"], mpp=0.33) as r:
        assert r.info.mpp == 0.33
    with OpenSlideReader(slides["nompp"]) as r:
        assert r.info.mpp is None


def _read_in_worker(reader):
    return reader.read_region((2000, 1500), 0, (16, 16)).sum()


def test_reader_reopens_in_worker_process(slides):
    r = OpenSlideReader(slides["tiff"])
    expected = r.read_region((2000, 1500), 0, (16, 16)).sum()
    clone = pickle.loads(pickle.dumps(r))
    assert clone.info == r.info
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_read_in_worker, (r,)) == expected


def test_errors_name_the_file(slides, tmp_path):
    with pytest.raises(tiling.SlideNotFoundError, match="missing.svs"):
        OpenSlideReader(tmp_path / "missing.svs")
    with pytest.raises(tiling.SlideOpenError, match="notaslide.svs.*cannot open"):
        OpenSlideReader(slides["notaslide"])
    with pytest.raises(tiling.SlideOpenError, match="is a folder"):
        OpenSlideReader(tmp_path)


def test_array_reader_pyramid_and_region(he_image):
    img, _ = he_image
    before = img.copy()
    r = ArrayReader(img, mpp=0.5, downsamples=(1, 4))
    assert r.info.level_dimensions == ((1536, 1024), (384, 256))
    np.testing.assert_array_equal(r.read_region((100, 200), 0, (50, 40)), img[200:240, 100:150])
    small = r.read_region((400, 400), 1, (10, 10))
    np.testing.assert_allclose(small.astype(float), img[400:440, 400:440].reshape(10, 4, 10, 4, 3).mean((1, 3)), atol=1)
    np.testing.assert_array_equal(img, before)


def test_plain_png_needs_mpp(tmp_path, he_image):
    from PIL import Image

    p = tmp_path / "patch.png"
    Image.fromarray(he_image[0]).save(p)
    with pytest.raises(tiling.MissingMppError, match="patch.png.*--mpp"):
        open_slide(p)
    r = open_slide(p, mpp=0.5)
    assert isinstance(r, ArrayReader) and r.info.mpp == 0.5 and r.info.level_count >= 2


@pytest.mark.real_data
def test_real_aperio_slide(cmu_slide):
    with OpenSlideReader(cmu_slide) as r:
        assert r.info.vendor == "aperio"
        assert r.info.mpp == pytest.approx(0.499, abs=1e-3)
        assert r.info.dimensions == (2220, 2967)
        tissue = tiling.detect_tissue(r)
        grid = tiling.make_grid(r, tissue, tiling.GridSpec(tile_px=224, mpp=0.5))
        assert 20 < len(grid) < 120
        tile = tiling.read_tile(r, grid.iloc[0])
        assert tile.shape == (224, 224, 3)
        # H&E: tissue tiles are far from white
        assert tile.mean() < 200
