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


def _random_regions(reader, n, rng):
    """``n`` (location, level, size) reads over every level: on the level's pixel grid (the direct
    decoder's) or between its pixels (OpenSlide's), some past the slide's edges."""
    for i in range(n):
        level = i % reader.info.level_count
        d = reader.info.level_downsamples[level]
        w, h = reader.info.level_dimensions[level]
        x, y = int(rng.integers(-40, w + 10)), int(rng.integers(-40, h + 10))
        loc = (round(x * d), round(y * d)) if i % 5 else (int(x * d) + 1, int(y * d) + 1)
        yield loc, level, (int(rng.integers(1, 400)), int(rng.integers(1, 400)))


@pytest.mark.parametrize("kind", ["tiff", "svs"])
def test_direct_tiff_decoder_gives_openslides_pixels(slides, kind):
    from tiling.tiffreader import TiffTileReader

    rng = np.random.default_rng(3)
    with OpenSlideReader(slides[kind]) as ref, TiffTileReader(slides[kind], cache_mb=2) as ours:
        assert ours.info == ref.info
        for loc, level, size in _random_regions(ref, 120, rng):
            a, b = ref.read_region(loc, level, size), ours.read_region(loc, level, size)
            assert b.shape == a.shape and b.dtype == np.uint8
            np.testing.assert_array_equal(b, a, err_msg=f"{kind} level {level} at {loc}, {size}")
        assert ours._cached_bytes <= 2e6 or len(ours._cache) == 1  # the cache stays within its bound
        np.testing.assert_array_equal(
            ours.read_level(ref.info.level_count - 1), ref.read_level(ref.info.level_count - 1)
        )


@pytest.mark.real_data
def test_direct_tiff_decoder_on_a_real_aperio_slide(cmu_slide):
    rng = np.random.default_rng(4)
    with OpenSlideReader(cmu_slide) as ref, open_slide(cmu_slide, decoder="auto") as ours:
        assert type(ours).__name__ == "TiffTileReader"
        for loc, level, size in _random_regions(ref, 60, rng):
            np.testing.assert_array_equal(ours.read_region(loc, level, size), ref.read_region(loc, level, size))


def test_open_slide_decoder_choice_and_errors(slides, tmp_path):
    from tiling.tiffreader import TiffTileReader, tiff_levels

    assert type(open_slide(slides["tiff"])).__name__ == "OpenSlideReader"  # the default
    assert isinstance(open_slide(slides["svs"], decoder="auto"), TiffTileReader)
    with OpenSlideReader(slides["tiff"]) as r:
        assert tiff_levels(slides["tiff"], r.info.level_dimensions) is not None
        assert tiff_levels(slides["tiff"], [(7, 7)]) is None  # no page of that size: OpenSlide reads it
    # uncompressed YCbCr would come out of tifffile unconverted: left to OpenSlide; plain RGB is read
    import tifffile

    img = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(tmp_path / "ycc.tif", img, tile=(16, 16), photometric="ycbcr", subsampling=(1, 1))
    tifffile.imwrite(tmp_path / "rgb.tif", img, tile=(16, 16), photometric="rgb")
    assert tiff_levels(tmp_path / "ycc.tif", [(64, 64)]) is None
    assert tiff_levels(tmp_path / "rgb.tif", [(64, 64)]) == [0]
    with pytest.raises(ValueError, match="decoder"):
        open_slide(slides["tiff"], decoder="nvjpeg")
    with pytest.raises(tiling.SlideError, match="empty.svs"):
        open_slide(slides["empty"], decoder="auto")
    # a tile whose JPEG data is zeroed: an error naming the file and the tile, the reader still usable
    with TiffTileReader(slides["corrupt_middle"]) as r:
        w, h = r.info.level_dimensions[0]
        with pytest.raises(tiling.TileReadError, match=r"corrupt_middle\.tif.*failed to decode region at .*TIFF tile"):
            for y in range(0, h, 256):
                r.read_region((w // 2, y), 0, (64, 64))
        assert r.read_region((0, 0), 0, (32, 32)).shape == (32, 32, 3)
    # worker processes re-open it by path
    r2 = pickle.loads(pickle.dumps(TiffTileReader(slides["tiff"])))
    np.testing.assert_array_equal(
        r2.read_region((100, 100), 0, (50, 50)), open_slide(slides["tiff"]).read_region((100, 100), 0, (50, 50))
    )
