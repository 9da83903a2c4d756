"""Reports opened from disk in real headless Chromium: no console errors, linked selection,
links that resolve, no CDN, escaped text, bounded size."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PageWatch, copy_run
from wsi_explain import RunFolder
from wsi_explain.report.names import save_cluster_name
from wsi_explain.core.config import ScoreConfig
from wsi_explain.stages.report import run_report_stage
from wsi_explain.stages.score import run_score_stage


@pytest.fixture(scope="module")
def reported(audit_run, tmp_path_factory):
    run_dir = copy_run(audit_run, tmp_path_factory.mktemp("reported") / "run")
    save_cluster_name(run_dir, 0, "benign <b>glands</b>", "checked by <script>alert(3)</script>")
    with RunFolder(run_dir) as run:
        run_score_stage(run, ScoreConfig(per_cluster=4, steps=4, road_percentiles=(50,), infidelity_samples=2,
                                         sensitivity_samples=2, sanity_tiles=2, n_boot=50, baselines=("constant",)))
        out = run_report_stage(run)
    return run_dir, out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.refs.append((tag, v))


def _refs(page: Path) -> list[tuple[str, str]]:
    p = _Links()
    p.feed(page.read_text())
    return p.refs


def test_pages_links_and_offline_scripts(reported):
    run_dir, out = reported
    rep = run_dir / "report"
    pages = [rep / "index.html"] + sorted((rep / "clusters").glob("*.html")) + sorted((rep / "slides").glob("*.html"))
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    assert len(pages) == 1 + tiles["cluster"].nunique() + tiles["slide_id"].nunique() == out.n_pages
    for page in pages:
        for tag, ref in _refs(page):
            assert not ref.startswith(("http:", "https:", "//")), f"{page.name} loads {ref} from the network"
            if ref.startswith(("data:", "#")):
                continue
            assert (page.parent / ref).resolve().is_file(), f"{page.name}: broken {tag} link {ref}"
        scripts = [r for t, r in _refs(page) if t == "script"]
        assert scripts and all("static/bokeh" in s for s in scripts)
    # bounded: tile images for representative tiles only, not one per tile
    assert 0 < out.n_images < len(tiles) / 2
    assert sum(f.stat().st_size for f in rep.rglob("*") if f.is_file()) < 30e6


def test_text_reaching_html_is_escaped(reported):
    run_dir, _ = reported
    rep = run_dir / "report"
    for page in rep.rglob("*.html"):
        raw = page.read_text()
        assert "<script>alert" not in raw and "<img src=x" not in raw and "<b>glands</b>" not in raw, page.name
    slide_pages = "".join(p.read_text() for p in (rep / "slides").glob("*.html"))
    assert "&lt;script&gt;alert(1)&lt;script&gt;.svs" in slide_pages  # the file name, shown as text
    assert "&lt;img src=x onerror=alert(2)&gt;" in slide_pages  # the site column
    assert "benign &lt;b&gt;glands&lt;/b&gt;" in (rep / "clusters/cluster_0.html").read_text()


def test_report_in_chromium_selection_links_views(reported, browser):
    run_dir, _ = reported
    w = PageWatch(browser)
    w.page.goto((run_dir / "report/index.html").as_uri())
    w.page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('umap')")
    w.page.wait_for_timeout(1000)
    assert w.model("tiles", "m.selected.indices.length") == 0
    w.drag_select("umap")
    n = w.model("tiles", "m.selected.indices.length")
    assert n > 0
    # the slide panel draws the same source: the same tiles light up there
    assert w.model("slide_tiles", "m.data_source.selected.indices.length") == n
    gallery = w.model("gallery", "m.text")
    assert f"{n} tile" in gallery and "<img" in gallery
    # a click on a cluster row selects that cluster's tiles
    w.page.locator(".slick-row").nth(1).click()
    w.page.wait_for_timeout(500)
    tiles = pd.read_parquet(run_dir / "cohort/tiles.parquet")
    c = w.model("clusters", "m.data.cluster[m.selected.indices[0]]")
    assert w.model("tiles", "m.selected.indices.length") == int((tiles["cluster"] == c).sum())
    # the colour menu recolours both views (the drawn column changes)
    before = w.model("tiles", "m.data.colour.slice(0, 50).join()")
    w.page.evaluate("() => { Bokeh.documents[0].get_model_by_name('colour_by').value = 'probability'; }")
    w.page.wait_for_timeout(300)
    assert w.model("tiles", "m.data.colour.slice(0, 50).join()") != before
    # the slide picker switches the slide panel
    other = sorted(tiles["slide_id"].unique())[1]
    w.page.evaluate(f"() => {{ Bokeh.documents[0].get_model_by_name('slide_picker').value = {other!r}; }}")
    w.page.wait_for_timeout(300)
    assert w.page.evaluate("() => Bokeh.documents[0].get_model_by_name('slide_tiles').view.filter.group") == other
    for page in ("clusters/cluster_0.html", "slides/generic.html"):
        w.page.goto((run_dir / "report" / page).as_uri())
        w.page.wait_for_timeout(800)
    assert w.errors == [] and w.dialogs == []
    w.close()


def test_cli_report_and_serve_refuse_unclustered_runs(reported, extracted, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run_dir = copy_run(reported[0], tmp_path / "run")
    res = subprocess.run([sys.executable, "-m", "wsi_explain.cli", "report", str(run_dir)], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0 and "report:" in res.stdout and "pages" in res.stdout, res.stdout + res.stderr
    ext = copy_run(extracted, tmp_path / "ext")
    for cmd in (["report", str(ext)], ["serve", str(ext), "--port", "1"]):
        res = subprocess.run([sys.executable, "-m", "wsi_explain.cli", *cmd], cwd=repo, capture_output=True, text=True)
        assert res.returncode == 2 and "not clustered" in " ".join(res.stderr.split()), (cmd, res.stdout, res.stderr)
