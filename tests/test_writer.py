"""The pyramidal TIFF/SVS writer produces files OpenSlide reads level by level."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import tiling
from tests.conftest import synthetic_he


@pytest.mark.parametrize("compression", ["jpeg", "deflate"])
def test_levels_are_top_level_pages(tmp_path, compression):
    img, _ = synthetic_he(1024, 1536, seed=4)
    p = tiling.write_pyramidal_tiff(tmp_path / "s.tif", img, mpp=0.5, compression=compression, min_level_size=128)
    with tifffile.TiffFile(p) as tf:
        assert len(tf.pages) == 4 and all(pg.is_tiled for pg in tf.pages)
        assert not tf.pages[0].subifds
    with tiling.OpenSlideReader(p) as r:
        assert r.info.level_dimensions == ((1536, 1024), (768, 512), (384, 256), (192, 128))
        got = r.read_region((0, 0), 0, (1536, 1024))
        tol = 0 if compression == "deflate" else 6
        assert np.abs(got.astype(int) - img.astype(int)).mean() <= tol


def test_svs_is_aperio(tmp_path):
    img, _ = synthetic_he(1024, 1024, seed=5)
    p = tiling.write_svs(tmp_path / "s.svs", img, mpp=0.25, magnification=40)
    with tiling.OpenSlideReader(p) as r:
        assert r.info.vendor == "aperio"
        assert r.info.mpp == pytest.approx(0.25)
        assert r.info.objective_power == 40
