"""The deep-zoom pyramid of the served explorer: tiles read from real pyramidal files equal the
slide's pixels at every zoom, edges pad white, requests outside the grid or the cohort are refused
before any read, the cache lives in the run folder; the heat-map layer is the stored maps, stitched
and smooth; the QC layer draws the tile stage's ink mask and the blurred tiles."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import copy_run
from wsi_explain.io.deepzoom import BLANK_PNG, DeepZoomSlide, DeepZoomTiles, zmax_for
from wsi_explain.io.tile_images import TileImageError


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


@pytest.fixture(scope="module")
def pyramid(slides, tmp_path_factory):
    from tiling import open_slide

    with open_slide(slides["tiff"]) as r:
        w, h = r.info.dimensions
    d = DeepZoomSlide(str(slides["tiff"]), w, h, 0.25)
    return DeepZoomTiles({"generic": d}, cache_dir=tmp_path_factory.mktemp("dz") / "cache"), (w, h)


def test_zmax_and_geometry(pyramid):
    dz, (w, h) = pyramid
    assert (w, h) == (4096, 3072)
    assert dz.zmax == zmax_for(w, h) == 4  # 256 * 2**4 = 4096 covers the slide
    assert zmax_for(256, 100) == 0 and zmax_for(257, 10) == 1
    assert dz.region("generic", 4, 3, 2) == (768, 512, 256, 256, 1.0)
    assert dz.region("generic", 0, 0, 0) == (0, 0, 4096, 3072, 16.0)
    assert dz.region("generic", 4, 15, 12)[2:4] == (256, 0)  # in the grid, below the slide


def test_tiles_are_the_slides_pixels_at_every_zoom(pyramid, slides):
    """Level 0 is read 1:1; a coarser zoom equals the level-0 region mean-pooled (JPEG tolerance)."""
    from tiling import open_slide

    dz, _ = pyramid
    with open_slide(slides["tiff"]) as r:
        full = r.read_region((1024, 512), 0, (1024, 1024)).astype(np.float32)
    got = _rgb(dz.tissue("generic", 4, 4, 2))  # level-0 px 1024..1280 x 512..768
    assert got.shape == (256, 256, 3)
    assert np.abs(got - full[:256, :256]).mean() < 4
    got2 = _rgb(dz.tissue("generic", 2, 1, 0))  # 4 level-0 px per px: 1024..2048 x 0..1024
    with open_slide(slides["tiff"]) as r:
        region = r.read_region((1024, 0), 0, (1024, 1024)).astype(np.float32)
    pooled = region.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
    assert np.abs(got2 - pooled).mean() < 6
    # zoom zmax + 1 (fetched ahead by the browser): level 0 enlarged 2x
    over = _rgb(dz.tissue("generic", 5, 8, 4))  # level-0 px 1024..1152 x 512..640
    assert np.abs(over[::2, ::2] - full[:128, :128]).mean() < 10


def test_edges_pad_white_and_outside_is_blank(pyramid):
    dz, _ = pyramid
    edge = _rgb(dz.tissue("generic", 0, 0, 0))  # the whole slide in one tile: 256 x 192 px of slide
    assert edge[200:].min() == pytest.approx(255, abs=3)  # white below the slide's bottom edge
    assert edge[:150].std() > 5  # tissue above it
    assert dz.tissue("generic", 4, 3, 13) == BLANK_PNG


@pytest.mark.parametrize(
    "args",
    [
        ("generic", 6, 0, 0),  # deeper than zmax + 1
        ("generic", -1, 0, 0),
        ("generic", 2, 4, 0),  # x beyond the grid of zoom 2
        ("generic", 2, 0, -1),
        ("generic", 10**9, 0, 0),
        ("../generic", 0, 0, 0),
        ("..", 0, 0, 0),
        ("generic/../../etc", 0, 0, 0),
        ("other", 0, 0, 0),
        ("", 0, 0, 0),
    ],
)
def test_out_of_range_and_unknown_slides_are_refused(pyramid, args):
    dz, _ = pyramid
    with pytest.raises(TileImageError):
        dz.tissue(*args)


def test_tiles_are_cached_in_the_cache_folder(pyramid):
    dz, _ = pyramid
    first = dz.tissue("generic", 3, 1, 1)
    path = dz.cache_dir / "generic" / "tissue" / "3" / "1_1.jpg"
    assert path.read_bytes() == first
    path.write_bytes(first[:-2] + b"\xff\xd9")  # a changed cache file is what comes back: no re-read
    assert dz.tissue("generic", 3, 1, 1) == first[:-2] + b"\xff\xd9"
    assert not (dz.cache_dir / "generic" / "tissue" / "4" / "3_13.jpg").exists()  # blanks are not cached
    assert all(dz.cache_dir in p.parents for p in dz.cache_dir.rglob("*"))


def test_the_cache_folder_names_what_the_tiles_depend_on(pyramid, slides, tmp_path, monkeypatch):
    """Another grid (a larger slide joins), tile size or run record: another cache folder. A
    coarsest level over the in-memory bound is read region by region, with the same pixels."""
    import wsi_explain.io.deepzoom as D

    dz, (w, h) = pyramid
    same = DeepZoomTiles(dict(dz.slides), cache_dir=tmp_path)
    assert same.version == dz.version and same.cache_dir == tmp_path / dz.version
    bigger = DeepZoomTiles({**dz.slides, "big": DeepZoomSlide("x.tif", 5000, 100)}, cache_dir=tmp_path)
    assert bigger.zmax == dz.zmax + 1 and bigger.version != dz.version
    assert DeepZoomTiles(dict(dz.slides), tile_px=512).version != dz.version
    assert DeepZoomTiles(dict(dz.slides), version="extract: later").version != dz.version
    coarse = _rgb(dz.tissue("generic", 0, 0, 0))
    monkeypatch.setattr(D, "MAX_LEVEL_PX", 16)
    fresh = DeepZoomTiles(dict(dz.slides))
    assert np.abs(_rgb(fresh.tissue("generic", 0, 0, 0)) - coarse).mean() < 2 and not fresh._levels


def test_heat_canvas_is_the_stored_maps_stitched_and_smooth():
    from wsi_explain.io.deepzoom_layers import _sample, heat_canvas

    rng = np.random.default_rng(0)
    maps = rng.random((6, 4, 4)).astype(np.float32)
    boxes = np.array([[x * 400, y * 400, 400] for y in range(2) for x in range(3)], np.float64)
    before = maps.copy()
    canvas, cell = heat_canvas(boxes, maps, width=1300, height=900)
    assert np.array_equal(maps, before)  # inputs not modified
    assert cell == 100 and canvas.shape == (9, 13, 2)
    vmax = np.percentile(maps, 99)
    # each map cell sits in its footprint, scaled by the slide's 99th percentile
    assert np.allclose(canvas[4:8, 8:12, 0], np.clip(maps[5] / vmax, 0, 1), atol=1e-5)
    assert canvas[:8, :12, 1].min() == 1 and canvas[8:, :, 1].max() == 0 and canvas[:, 12:, 1].max() == 0
    # sampled at a cell centre: the cell's value; between cells: linear in between (no jump at the
    # border of two tiles)
    v = _sample(canvas, cell, 350, 150, 1, 100)  # level-0 px 350..450 across the x = 400 tile border
    assert v[0, 0, 0] == pytest.approx(canvas[1, 3, 0], abs=0.02)
    steepest = np.abs(np.diff(canvas[..., 0], axis=1)).max() / 100  # per level-0 px, linear interpolation
    assert np.abs(np.diff(v[..., 0], axis=1)).max() <= steepest * 1.01 + 1e-6
    # coverage fades to 0 half a cell outside the tiles
    edge = _sample(canvas, cell, 1150, 150, 1, 200)[0, :, 1]
    assert edge[0] == pytest.approx(1, abs=0.01) and edge[-1] == 0
    top = _sample(canvas, cell, 150, 0, 1, 1)[0, 0, 1]  # the slide's top edge: half a cell of fade
    assert top == pytest.approx(0.505, abs=0.01)


def test_overlay_layers_on_a_real_run(audit_run, tmp_path):
    """Heat tiles: opaque over the tiles and transparent off them; QC tiles: the ink codes of the
    tile stage's mask in magenta, a tile under the sharpness floor in blue; unknown methods refused."""
    from wsi_explain.io.deepzoom_layers import BLUR_RGBA, INK_RGBA, OverlayTiles

    run = copy_run(audit_run, tmp_path / "run")
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    sid = sorted(tiles.slide_id.unique())[0]
    dz = DeepZoomTiles.from_run(run, [sid])
    # a painted ink stripe in the coded mask, and one blurred tile
    sdir = run / "slides" / sid
    meta_scale = json.loads(
        __import__("pyarrow.parquet").parquet.read_schema(sdir / "tiles.parquet").metadata[b"wsi_explain"]
    )["tissue_mask_scale"]
    mask = np.asarray(Image.open(sdir / "tissue.png")).copy()
    mask[:, :4] = 2
    Image.fromarray(mask).save(sdir / "tissue.png")
    t = tiles[tiles.slide_id == sid].copy()
    blurred = t.iloc[len(t) // 2]
    t.loc[t.index[len(t) // 2], "sharpness"] = 0.0
    t.loc[t.index != t.index[len(t) // 2], "sharpness"] = 1.0
    ov = OverlayTiles(run, dz, t)
    z = dz.zmax - 2
    d = dz.downsample(z)

    def pixel(layer: str, X: float, Y: float, **kw) -> np.ndarray:
        """The RGBA of the overlay pixel over level-0 (X, Y)."""
        tx, ty = int(X // (256 * d)), int(Y // (256 * d))
        img = np.asarray(Image.open(io.BytesIO(ov.tile(layer, sid, z, tx, ty, **kw))))
        return img[int((Y - ty * 256 * d) / d), int((X - tx * 256 * d) / d)]

    assert tuple(pixel("qc", 2 * meta_scale, 5 * meta_scale)) == INK_RGBA  # in the painted stripe
    assert blurred.x > 8 * meta_scale  # clear of the stripe
    assert tuple(pixel("qc", blurred.x + blurred.size0 / 2, blurred.y + blurred.size0 / 2)) == BLUR_RGBA
    sharp = t.iloc[0] if t.index[0] != blurred.name else t.iloc[1]
    if sharp.x > 8 * meta_scale:
        assert pixel("qc", sharp.x + sharp.size0 / 2, sharp.y + sharp.size0 / 2)[3] == 0
    method = ov.methods(sid)[0]
    first = t.iloc[0]
    assert pixel("heat", first.x + first.size0 / 2, first.y + first.size0 / 2, method=method)[3] == 255
    heat = np.asarray(Image.open(io.BytesIO(ov.tile("heat", sid, z, 0, 0, method=method))))
    assert heat.shape == (256, 256, 4) and heat[..., 3].min() == 0  # transparent off the tissue
    with pytest.raises(TileImageError):
        ov.tile("heat", sid, z, 0, 0, method="../../manifest")
    with pytest.raises(TileImageError):
        ov.tile("heat", sid, z, 0, 0, method="nomethod")
    with pytest.raises(TileImageError):
        ov.tile("other", sid, z, 0, 0)
    assert (dz.cache_dir / sid / f"heat-{method}" / str(z) / "0_0.png").exists()
    assert (dz.cache_dir / sid / "qc" / str(z)).is_dir() and dz.cache_dir.parent == run / "cache/dz"


def test_a_moved_slide_is_named_and_the_rest_works(audit_run, tmp_path):
    """A slide whose file moved since the run: its tiles are refused (404), the explorer document
    still builds, and its slide panel says which file is missing."""
    from bokeh.document import Document
    from bokeh.models import Div

    from wsi_explain.io.tile_images import TileImages
    from wsi_explain.report.serve import deep_zoom_sources, explorer_document

    run = copy_run(audit_run, tmp_path / "run")
    tiles = pd.read_parquet(run / "cohort/tiles.parquet")
    sids = sorted(tiles.slide_id.unique())
    pyramid, _ = deep_zoom_sources(run, sids)
    moved = sids[0]
    pyramid.slides[moved] = DeepZoomSlide(str(tmp_path / "gone.svs"), *list(vars(pyramid.slides[moved]).values())[1:])
    assert "gone.svs" in pyramid.problem(moved) and pyramid.problem(sids[1]) is None
    with pytest.raises(ValueError, match="gone.svs"):
        pyramid.tissue(moved, 0, 0, 0)
    assert pyramid.tissue(sids[1], 0, 0, 0)[:2] == b"\xff\xd8"
    doc = Document()
    explorer_document(doc, run, TileImages(run), pyramid=pyramid)
    texts = [m.text for m in doc.roots[0].select({"type": Div})]
    assert not any("could not be built" in t for t in texts)
    status = doc.get_model_by_name("dz_status")
    assert "gone.svs" in status.text and "cannot be shown" in status.text


def test_tiles_decoded_directly_equal_openslides_in_every_thread(pyramid):
    """The tile server reads a tiled TIFF through one direct decoder per serving thread (the decoder
    is not thread-safe); what it serves is OpenSlide's pixels."""
    from concurrent.futures import ThreadPoolExecutor

    from tiling import TiffTileReader

    dz, _ = pyramid
    tiles = [(z, x, y) for z in (2, 3, 4) for x in range(3) for y in range(2)]
    assert isinstance(dz._direct("generic"), TiffTileReader)
    with ThreadPoolExecutor(4) as pool:
        direct = list(pool.map(lambda t: dz.tissue_rgb("generic", *t), tiles))
    dz._local.readers = {"generic": None}  # this thread: OpenSlide's reader
    try:
        for t, got in zip(tiles, direct):
            ref = dz.tissue_rgb("generic", *t)
            assert (got is None) == (ref is None)
            if ref is not None:
                np.testing.assert_array_equal(got, ref, err_msg=str(t))
    finally:
        dz._local.readers = {}
