"""The explorer server in real headless Chromium: linked selection, on-demand tile images,
cluster naming, localhost binding and path-traversal attempts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PageWatch, copy_run

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(audit_run, tmp_path_factory):
    run_dir = copy_run(audit_run, tmp_path_factory.mktemp("served") / "run")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_explain.cli", "serve", str(run_dir), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # a broken explorer fails the fixture, never hangs the suite
    while True:
        try:
            # the first page builds the explorer document: seconds on a loaded 2-core machine
            urllib.request.urlopen(url + "/explorer", timeout=60)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the explorer server did not answer ({exc}): {proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
    yield url, run_dir, port
    proc.terminate()
    proc.wait(10)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_tiles_on_demand_and_path_traversal_refused(server):
    url, run_dir, _ = server
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    sid, tid = tiles.iloc[0]["slide_id"], int(tiles.iloc[0]["tile_id"])
    status, body = _get(f"{url}/tiles/{sid}/{tid}.png?method=gradcam&size=64")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "cache/tiles" / sid / f"{tid}_gradcam_64.png").read_bytes() == body  # cached in the run folder
    status, strip = _get(f"{url}/tiles/{sid}/{tid}.png?method=all&size=0")
    assert status == 200 and len(strip) > len(body)
    for bad in (
        "/tiles/..%2F..%2Fmanifest/1.png",
        "/tiles/%2E%2E/1.png",
        f"/tiles/{sid}/999999.png",
        f"/tiles/{sid}/{tid}.png?method=..%2F..%2Fmanifest.json",
        f"/tiles/{sid}/{tid}.png?size=100000",
        "/tiles/..%2Fslides%2Fgeneric/1.png",
        "/overview/..%2Fmanifest.png",
        "/static/..%2F..%2F..%2Fetc%2Fpasswd",
    ):
        status, body = _get(url + bad)
        assert status in (400, 403, 404), (bad, status)
        assert b"schema_version" not in body and b"root:" not in body


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":  # LISTEN
                out.append(addr)
    return out


def test_binds_to_localhost_only(server):
    _, _, port = server
    addrs = _listening(port)
    assert addrs, "no listening socket found"
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1
    assert set(addrs) <= loopback, f"listening on {addrs}"


def test_explorer_in_chromium(server, browser):
    url, run_dir, _ = server
    w = PageWatch(browser)
    w.page.goto(url + "/explorer")
    w.page.wait_for_function(
        "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('umap')"
    )
    w.page.wait_for_timeout(1500)
    w.drag_select("umap")
    n = w.model("tiles", "m.selected.indices.length")
    assert n > 0 and w.model("slide_tiles", "m.data_source.selected.indices.length") == n
    img = w.page.locator("img[src^='/tiles/']").first
    img.wait_for(timeout=20000)
    w.page.wait_for_function("() => true")
    assert w.page.locator("img[src^='/tiles/']").count() > 0
    w.page.wait_for_timeout(1500)
    assert img.evaluate("e => e.naturalWidth") == 96  # cut from the slide by the server
    # a box on the slide selects those tiles in the UMAP
    w.model("tiles", "(m.selected.indices = [], 0)")
    w.drag_select("slide", frac=(0.3, 0.3, 0.7, 0.7))
    assert w.model("tiles", "m.selected.indices.length") > 0
    # find similar: a tile and its nearest neighbours across the cohort fill the selection (and the
    # gallery), the same rows the saved index gives; picking a neighbour shows its slide
    from clustering import NeighbourIndex

    w.model("tiles", "(m.selected.indices = [3], 0)")
    w.page.locator("button", has_text="Find similar").click()
    w.page.wait_for_function(
        "() => Bokeh.documents[0].get_model_by_name('tiles').selected.indices.length > 1", timeout=20000
    )
    got = w.model("tiles", "Array.from(m.selected.indices)")
    want, _ = NeighbourIndex(run_dir / "cohort/neighbours.faiss").similar([3], 24)
    assert got == [3, *[int(i) for i in want[0] if i >= 0]]
    assert "nearest tiles from" in w.model("similar_status", "m.text")
    tiles_df = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    other = next((r for r in got[1:] if tiles_df.slide_id[r] != w.model("slide_picker", "m.value")), None)
    assert other is not None  # the two slides' tiles mix among the neighbours (seeded)
    if other is not None:  # picking a neighbour on another slide switches the slide panel
        w.model("neighbours", f"(m.value = '{other}', 0)")
        want_slide = tiles_df.slide_id[other]
        w.page.wait_for_function(
            f"() => Bokeh.documents[0].get_model_by_name('slide_picker').value === {json.dumps(want_slide)}",
            timeout=10000,
        )
    # name a cluster from the page: saved, versioned, shown escaped
    w.page.locator("input[placeholder='cluster name']").fill("pen <i>ink</i>")
    w.page.locator("textarea[placeholder='comment']").fill("blue marker")
    w.page.locator("select:has(option[value='fold or bubble'])").select_option("pen ink")  # the verdict
    w.page.locator("button", has_text="Save name").click()
    w.page.wait_for_timeout(1500)
    doc = json.loads((run_dir / "cohort/cluster_names.json").read_text())
    assert doc["names"]["0"] == "pen <i>ink</i>" and doc["comments"]["0"] == "blue marker" and doc["version"] == 1
    assert doc["verdicts"] == {"0": "pen ink"} and doc["history"][0]["verdict"] == "pen ink"
    assert "pen &lt;i&gt;ink&lt;/i&gt;" in w.model("name_status", "m.text") and "pen ink" in w.model(
        "name_status", "m.text"
    )
    assert w.model("clusters", "m.data.name[0]") == "pen <i>ink</i>"  # a table cell, rendered as text
    # the verdict comes back with the page
    w.page.reload()
    w.page.wait_for_function(
        "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('verdict')"
    )
    assert w.model("verdict", "m.value") == "pen ink"
    assert w.errors == [] and w.dialogs == []
    w.close()


def test_a_broken_run_gives_an_error_page_not_a_hang(audit_run, tmp_path):
    """When the explorer cannot be built (here: an unreadable cluster table), the document says so
    in words (escaped) instead of leaving the page waiting."""
    from bokeh.document import Document
    from bokeh.models import Div

    from wsi_explain.report.serve import explorer_document

    run_dir = copy_run(audit_run, tmp_path / "run")
    (run_dir / "cohort/clusters.parquet").write_bytes(b"<not parquet>")
    doc = Document()
    explorer_document(doc, run_dir, images=None)
    texts = [m.text for m in doc.roots[0].select({"type": Div})]
    assert any("The explorer could not be built" in t for t in texts), texts


def _dz(run_dir: Path) -> Path:
    """The deep-zoom cache folder of the served run (one version: the run does not change)."""
    (folder,) = list((run_dir / "cache/dz").iterdir())
    return folder


def test_deep_zoom_tiles_over_http(server):
    """The pyramid's routes: JPEG tissue and PNG overlays, cached under the run; anything outside
    the grid, the cohort or the stored methods is a 404 and reads nothing."""
    import io

    import numpy as np
    from PIL import Image

    url, run_dir, _ = server
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    sid = sorted(tiles.slide_id.unique())[0]
    status, body = _get(f"{url}/dz/{sid}/tissue/0/0/0.jpg")
    assert status == 200 and body[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(body)).size == (256, 256)
    assert (_dz(run_dir) / sid / "tissue/0/0_0.jpg").read_bytes() == body
    status, heat = _get(f"{url}/dz/{sid}/heat/gradcam/1/0/0.png")
    assert status == 200 and np.asarray(Image.open(io.BytesIO(heat))).shape == (256, 256, 4)
    status, qc = _get(f"{url}/dz/{sid}/qc/1/0/0.png")
    assert status == 200 and qc[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in (
        f"/dz/{sid}/tissue/40/0/0.jpg",  # an absurd zoom
        f"/dz/{sid}/tissue/99999999999/0/0.jpg",
        f"/dz/{sid}/tissue/1/2/0.jpg",  # x beyond the grid of zoom 1
        f"/dz/{sid}/tissue/0/-1/0.jpg",
        f"/dz/{sid}/heat/..%2F..%2Fmanifest/0/0/0.png",
        f"/dz/{sid}/heat/nomethod/0/0/0.png",
        f"/dz/{sid}/other/0/0/0.png",
        "/dz/..%2F..%2Fcohort/tissue/0/0/0.jpg",
        "/dz/%2E%2E/tissue/0/0/0.jpg",
        "/dz/unknown_slide/tissue/0/0/0.jpg",
    ):
        status, body = _get(url + bad)
        assert status == 404, (bad, status)
    assert not list(_dz(run_dir).glob("unknown*")) and [p.parent for p in (run_dir / "cache/dz").iterdir()] == [
        run_dir / "cache/dz"
    ]


def _loaded(w, name: str) -> list[list[int]]:
    """(x, y, z) of the tiles a tile renderer has loaded."""
    return w.model(name, "Array.from(m.tile_source.tiles.values()).filter(t => t.loaded).map(t => t.tile_coords)")


def _layer(w, label: str):
    """The overlay switch called ``label`` (a checkbox's label, matched whole)."""
    import re

    return w.page.locator("label").filter(has_text=re.compile(f"^{re.escape(label)}$"))


def test_deep_zoom_in_chromium(server, browser):
    """Zoom to level 0 and back, switch overlays and their opacity, box-select at full resolution,
    the raw view side by side, another slide: tiles load from the server, no error in the page."""
    url, run_dir, _ = server
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    w = PageWatch(browser, viewport=(1800, 1400))
    w.page.goto(url + "/explorer")
    w.page.wait_for_function(
        "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('dz_tissue')"
    )
    w.page.wait_for_function(
        "() => Array.from(Bokeh.documents[0].get_model_by_name('dz_tissue').tile_source.tiles.values()).some(t => t.loaded)",
        timeout=30000,
    )
    zmax = w.model("dz_tissue", "m.tile_source.max_zoom")
    sid = w.model("slide_picker", "m.value")
    t = tiles[tiles.slide_id == sid].iloc[len(tiles[tiles.slide_id == sid]) // 2]
    cx, cy = float(t.x + t.size0 / 2), float(t.y + t.size0 / 2)
    # level 0: a 300-px window around a tile's centre (y counts upwards: -y)
    w.model(
        "slide",
        f"(m.x_range.setv({{start: {cx - 150}, end: {cx + 150}}}), m.y_range.setv({{start: {-cy - 150}, end: {-cy + 150}}}), 0)",
    )
    w.page.wait_for_function(
        f"() => Array.from(Bokeh.documents[0].get_model_by_name('dz_tissue').tile_source.tiles.values()).some(t => t.loaded && t.tile_coords[2] === {zmax})",
        timeout=30000,
    )
    assert f"zoom {zmax} of {zmax}" in w.model("dz_magnification", "m.text")
    assert "µm per screen px" in w.model("dz_magnification", "m.text")
    # the scale bar reads µm: its range is the view's level-0 px times the slide's µm per px
    mpp = json.loads(
        __import__("pyarrow.parquet")
        .parquet.read_schema(run_dir / "slides" / sid / "tiles.parquet")
        .metadata[b"wsi_explain"]
    )["level0_mpp"]
    span_um = w.model("dz_scale_bar", "m.range.end - m.range.start")
    assert w.model("dz_scale_bar", "m.visible") and span_um == pytest.approx(300 * mpp, rel=0.05)
    assert list((_dz(run_dir) / sid / "tissue" / str(zmax)).glob("*.jpg"))
    # the box select still links at full resolution: the tile under the view is selected
    w.drag_select("slide", frac=(0.3, 0.3, 0.7, 0.7))
    sel = w.model("tiles", "Array.from(m.selected.indices)")
    assert int(t.name) in sel
    assert w.model("slide_tiles", "m.data_source.selected.indices.length") == len(sel)
    # overlays on (clicked), opacity changed
    _layer(w, "heat map").click()
    _layer(w, "QC: ink and blur").click()
    assert w.model("dz_heat", "m.visible") and w.model("dz_qc", "m.visible")
    for layer in ("dz_heat", "dz_qc"):
        w.page.wait_for_function(
            f"() => Array.from(Bokeh.documents[0].get_model_by_name('{layer}').tile_source.tiles.values()).some(t => t.loaded)",
            timeout=30000,
        )
    assert list((_dz(run_dir) / sid).glob("heat-*/*/*.png")) and list((_dz(run_dir) / sid).glob("qc/*/*.png"))
    w.model("dz_alpha_heat", "(m.value = 0.8, 0)")
    w.model("dz_alpha_tiles", "(m.value = 0.1, 0)")
    assert (
        w.model("dz_heat", "m.alpha") == 0.8
        and w.model("slide_tiles", "m.glyph.fill_alpha.value ?? m.glyph.fill_alpha") == 0.1
    )
    methods = w.model("dz_method", "m.options")
    w.model("dz_method", f"(m.value = {methods[-1]!r}, 0)")
    assert w.model("dz_heat", "m.tile_source.extra_url_vars.method") == methods[-1]
    _layer(w, "tile colours").click()
    assert not w.model("slide_tiles", "m.visible")
    # the raw tissue beside it, on the same ranges
    w.page.locator("button", has_text="Raw tissue side by side").click()
    assert w.model("dz_raw_view", "m.visible")
    w.page.wait_for_function(
        "() => Array.from(Bokeh.documents[0].get_model_by_name('dz_raw_tissue').tile_source.tiles.values()).some(t => t.loaded)",
        timeout=30000,
    )
    assert w.model("dz_raw_view", "m.x_range.start") == w.model("slide", "m.x_range.start")
    # back out to the whole slide: a coarse zoom
    w.model("slide", "(m.x_range.setv({start: 0, end: 20000}), m.y_range.setv({start: -20000, end: 0}), 0)")
    w.page.wait_for_timeout(1000)
    text = w.model("dz_magnification", "m.text")
    assert int(text.split("pyramid zoom ")[1].split(" ")[0]) <= zmax - 3, text
    # another slide: every layer reads it
    other = next(s for s in w.model("slide_picker", "m.options") if s != sid)
    w.model("slide_picker", f"(m.value = {other!r}, 0)")
    for name in ("dz_tissue", "dz_heat", "dz_qc", "dz_raw_tissue"):
        assert w.model(name, "m.tile_source.extra_url_vars.slide") == other
    w.page.wait_for_function(
        "() => Array.from(Bokeh.documents[0].get_model_by_name('dz_tissue').tile_source.tiles.values()).some(t => t.loaded)",
        timeout=30000,
    )
    w.page.wait_for_timeout(1000)
    assert list((_dz(run_dir) / other / "tissue").glob("*/*.jpg"))
    assert w.errors == [] and w.dialogs == []
    w.close()
