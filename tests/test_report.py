"""Reports opened from disk in real headless Chromium: no console errors, linked selection,
links that resolve, no CDN, escaped text, bounded size."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import PageWatch, copy_run
from wsi_explain import RunFolder
from wsi_explain.core.config import ScoreConfig
from wsi_explain.report.names import save_cluster_name
from wsi_explain.stages.report import run_report_stage
from wsi_explain.stages.score import run_score_stage


@pytest.fixture(scope="module")
def reported(audit_run, tmp_path_factory):
    run_dir = copy_run(audit_run, tmp_path_factory.mktemp("reported") / "run")
    save_cluster_name(run_dir, 0, "benign <b>glands</b>", "checked by <script>alert(3)</script>", verdict="pen ink")
    with RunFolder(run_dir) as run:
        run_score_stage(
            run,
            ScoreConfig(
                per_cluster=4,
                steps=4,
                road_percentiles=(50,),
                infidelity_samples=2,
                sensitivity_samples=2,
                sanity_tiles=2,
                n_boot=50,
                baselines=("constant",),
            ),
        )
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
    for p in (rep / "slides").glob("*.html"):  # each slide page says how to see it at full resolution
        text = p.read_text()
        assert f"wsi-explain serve {run_dir}" in text and f"pick <b>{p.stem}</b>" in text, p.name
    assert "benign &lt;b&gt;glands&lt;/b&gt;" in (rep / "clusters/cluster_0.html").read_text()
    page = (rep / "clusters/cluster_0.html").read_text()
    assert "Against reference maps" in page and "deletion_auc_constant" in page and "the random map (" in page
    index = (rep / "index.html").read_text()
    assert "Confounder scan" in index and "too few slides in each label stratum" in index  # 1 slide per label


def test_report_in_chromium_selection_links_views(reported, browser):
    run_dir, _ = reported
    w = PageWatch(browser)
    w.page.goto((run_dir / "report/index.html").as_uri())
    w.page.wait_for_function(
        "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('umap')"
    )
    w.page.wait_for_timeout(1000)
    assert w.model("tiles", "m.selected.indices.length") == 0
    w.drag_select("umap")
    n = w.model("tiles", "m.selected.indices.length")
    assert n > 0
    # the slide panel draws the same source: the same tiles light up there
    assert w.model("slide_tiles", "m.data_source.selected.indices.length") == n
    gallery = w.model("gallery", "m.text")
    assert f"{n} tile" in gallery and "<img" in gallery and 'style="border: 3px solid #' in gallery
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
    # ... and the gallery's frames follow it (the cluster's tiles are still selected)
    assert w.model("tiles", "m.selected.indices.length") > 0 and "frame: probability" in w.model("gallery", "m.text")
    # labelled tiles can be coloured by the model's errors
    opts = w.page.evaluate("() => Bokeh.documents[0].get_model_by_name('colour_by').options")
    assert "error (label vs prediction)" in opts and "uncertainty (ensemble spread)" in opts
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
    res = subprocess.run(
        [sys.executable, "-m", "wsi_explain.cli", "report", str(run_dir)], cwd=repo, capture_output=True, text=True
    )
    assert res.returncode == 0 and "report:" in res.stdout and "pages" in res.stdout, res.stdout + res.stderr
    ext = copy_run(extracted, tmp_path / "ext")
    for cmd in (["report", str(ext)], ["serve", str(ext), "--port", "1"]):
        res = subprocess.run([sys.executable, "-m", "wsi_explain.cli", *cmd], cwd=repo, capture_output=True, text=True)
        assert res.returncode == 2 and "not clustered" in " ".join(res.stderr.split()), (cmd, res.stdout, res.stderr)


HOSTILE = "<script>alert('x')</script>&\"'"


def _no_markup_from(text: str, hostile: str = HOSTILE) -> None:
    assert hostile not in text and "<script>alert" not in text


@pytest.mark.parametrize(
    "field",
    [
        "slide id",
        "site",
        "label",
        "cluster name",
        "comment",
        "flag reason",
        "method",
        "nuisance column",
        "card",
        "run folder",
    ],
)
def test_templates_escape_every_user_controlled_field(tmp_path, field):
    """Each page template, rendered with a hostile string in one user-controlled field at a time
    (the rest plain), shows it as text: the template engine escapes it, no caller has to."""
    from wsi_explain.report.pages import fragment, render

    def v(name, plain):
        return HOSTILE if name == field else plain

    sid = v("slide id", "s1")
    cluster = {
        "id": 0,
        "name": v("cluster name", "glands"),
        "size": 3,
        "n_slides": 1,
        "positive_rate": 0.5,
        "ink": 0.0,
        "cam_ink": float("nan"),
        "flags": [v("flag reason", "ink")],
        "comment": v("comment", "ok"),
        "verdict": "pen ink",
    }
    table = fragment(viz_table({"slide_id": sid, "site": v("site", "A"), "label": v("label", "tumour")}))
    from bokeh.models import Div

    plots = {name: Div(text="plot") for name in ("explorer", "sanity", "maps")}
    common = {"title": v("cluster name", "t"), "static": "static", "plots": plots}
    pages = [
        render(
            tmp_path / "index.html",
            "index.html",
            **common,
            n_tiles=3,
            n_shown=3,
            n_clusters=1,
            cam=v("method", "gradcam"),
            generated="now",
            clusters=[cluster],
            metrics_table=table,
            gains=[f"{v('method', 'gradcam')}: deletion_auc_blur better than the random map"],
            sample_notes=[
                f"cluster 0: 1 of 3 sampled tiles could not be read (first: slide {sid} tile 2: {v('error', 'x')})"
            ],
            confounders=[f"within label 0 slides, the positive probability rises with {v('nuisance column', 'ink')}"],
            selftest={
                "header": ("plant", "recall"),
                "rows": [("ink", "0.50")],
                "lines": [f"control cohort: 1 FALSE flag(s): cluster 0: {v('flag reason', 'ink')}"],
            },
            sanity=[{"method": v("method", "gradcam"), "passed": False, "spearman": 0.1}],
            spread_keys=None,
            removal_table=None,
            verdict_effect=f"Removing the clusters marked as artefacts ({cluster['name']} (pen ink); ...",
            concepts={
                "n_positions": 10,
                "error": 0.1,
                "mean_table": table,
                "rows": [{"name": "concept_0", "auc": None, "r": 0.5, "images": [{"file": "a.jpg", "title": sid}]}],
            },
            slides=[sid],
            failures_table=None,
            task=("segmentation", "predicted"),
            mil={
                "lines": [f"The slide decisions of the MIL head rest most on {v('cluster name', 'glands')}."],
                "table": table,
            },
        ),
        render(
            tmp_path / "cluster.html",
            "cluster.html",
            **common,
            c={**cluster, "mean_confidence": 0.9},
            comment=cluster["comment"],
            verdict="pen ink",
            card=[f"The model predicts 50% of its 3 tiles on 1 slides {v('card', 'positive')}", f"on {sid}"],
            composition_table=table,
            metrics_table=None,
            gains=[f"{v('method', 'gradcam')}: deletion_auc_blur better than the random map"],
            sample_notes=[
                f"cluster 0: 1 of 3 sampled tiles could not be read (first: slide {sid} tile 2: {v('error', 'x')})"
            ],
            sections=[{"title": "Representative tiles", "tiles": [{"slide": sid, "tile": 1, "src": ""}]}],
        ),
        render(
            tmp_path / "slide.html",
            "slide.html",
            **common,
            file=v("slide id", "s1.svs"),
            slide_id=sid,
            run_dir=v("run folder", "/runs/a"),
            n_tiles=3,
            width=10,
            height=10,
            mpp=0.5,
            meta_table=table,
            scores_table=table,
            removal_table=None,
            cam=v("method", "gradcam"),
            clusters=[{"id": 0, "name": cluster["name"], "n": 3, "tiles": [{"tile": 1, "thumb": "", "strip": ""}]}],
        ),
    ]
    texts = [page.read_text() for page in pages]
    for text in texts:
        _no_markup_from(text)
    assert any("&lt;script&gt;alert(" in t for t in texts), f"{field} is shown on no page"


def viz_table(row: dict) -> str:
    import viz

    return viz.table_html(pd.DataFrame([row]))


def test_a_template_without_escaping_would_fail_the_check(tmp_path):
    """The check above can fail: the same string passed as markup reaches the page raw."""
    from wsi_explain.report.pages import fragment, render

    page = render(tmp_path / "p.html", "base.html", title="t")
    text = page.read_text().replace("<h1>t</h1>", "<h1>" + str(fragment(HOSTILE)) + "</h1>")
    with pytest.raises(AssertionError):
        _no_markup_from(text)


def test_error_column_marks_false_positives_and_negatives():
    from wsi_explain.report.explorer_inputs import colour_options, with_errors

    t = pd.DataFrame({"label_pos": [1.0, 0.0, 1.0, 0.0, None], "prob_pos": [0.9, 0.7, 0.2, 0.1, 0.9]})
    before = t.copy()
    out = with_errors(t)
    pd.testing.assert_frame_equal(t, before)
    assert out["error"].tolist()[:4] == ["right", "false positive", "false negative", "right"]
    assert (
        out["error"].iloc[4] == "unlabelled"
        and colour_options(out.assign(pred=0, cluster=0, slide_id="s"))["error (label vs prediction)"] == "error"
    )
    assert "error" not in with_errors(t.drop(columns="label_pos")).columns


def test_uncertainty_columns_follow_the_stored_ensemble(audit_run):
    """The cohort table carries each tile's predictive entropy (over log K) and, with an ensemble,
    the spread of its positive probability across the models, as the features store has it."""
    import zarr

    tiles = pd.read_parquet(audit_run / "cohort/tiles.parquet")
    assert tiles["entropy"].between(0, 1).all()
    p = tiles[["prob_0", "prob_1"]].to_numpy()
    np.testing.assert_allclose(tiles["entropy"], -(p * np.log(p)).sum(1) / np.log(2), rtol=1e-4)
    sid = tiles["slide_id"].iloc[0]
    g = zarr.open_group(str(audit_run / "slides" / sid / "features.zarr"), mode="r")
    mine = tiles[tiles["slide_id"] == sid]
    np.testing.assert_allclose(
        mine["ensemble_std"], np.asarray(g["ensemble/probs_std"][:])[mine["tile_id"], 1], rtol=1e-6
    )


def test_verdicts_reach_the_report_with_their_effect(reported):
    """A cluster's verdict shows in the cluster table and on its page, and the index says what
    removing the clusters marked as artefacts does to the cohort AUC and the slide scores."""
    run_dir, _ = reported
    out = run_dir / "report"
    index = (out / "index.html").read_text()
    assert "Pathologists&#39; verdicts" in index or "Pathologists' verdicts" in index
    assert "<td>pen ink</td>" in index and "Removing the clusters marked as artefacts (benign" in index
    assert "moves the cohort AUC (top-8 score) from" in index
    assert "<b>Verdict:</b> pen ink" in (out / "clusters/cluster_0.html").read_text()


def test_cluster_page_opens_with_a_card_in_words(reported):
    """The cluster page opens with the card (prediction, what the maps look at, faithfulness
    against a random map, the randomisation check, flags and removal, the verdict), and the metric
    table says which way each metric improves and what it means."""
    run_dir, _ = reported
    page = (run_dir / "report/clusters/cluster_0.html").read_text()
    card = page[page.index('id="card"') : page.index("</div>", page.index('id="card"'))]
    assert "The model predicts" in card and "tiles on" in card and "mean confidence" in card
    assert "maps put" in card and "of their mass off tissue" in card
    assert "faithfulness" in card.lower() and "model-randomisation check" in card
    assert "Removing this cluster&#39;s tiles moves" in card or "Removing this cluster's tiles moves" in card
    assert "Verdict: pen ink." in card
    assert page.index('id="card"') < page.index("<h2>Metrics</h2>")
    assert "<th>better</th>" in page and "<th>meaning</th>" in page
    assert "lower</td>" in page and "area under the target probability" in page


def test_cluster_card_says_what_is_missing():
    from wsi_explain.report.card import cluster_card

    row = {"size": 40, "n_slides": 3, "positive_rate": 0.9, "mean_confidence": 0.8, "mean_tissue": 0.95}
    lines = cluster_card(row, cohort_positive=0.4, cam="gradcam")
    assert lines[0].startswith("The model predicts 90% of its 40 tiles on 3 slides positive (the cohort: 40%)")
    assert "was not measured" in lines[1] and "not scored" in lines[2] and "not run" in lines[3]
    assert lines[4] == "No flag. The cluster-removal effect was not computed."
    assert lines[5].startswith("No verdict yet")
    metrics = pd.DataFrame(
        {
            "method": ["gradcam"] * 3,
            "metric": ["deletion_auc_blur_gain_vs_random", "insertion_auc_blur_gain_vs_random", "sanity_spearman"],
            "value": [0.1, -0.05, 0.12],
            "ci_low": [0.05, -0.08, np.nan],
            "ci_high": [0.15, -0.01, np.nan],
        }
    )
    sanity = [{"method": "gradcam", "passed": True, "spearman": 0.1}]
    lines = cluster_card(
        {**row, "flags": ["artefact_positive"], "removal_effect": 0.31},
        cohort_positive=0.4,
        cam="gradcam",
        metrics=metrics,
        sanity=sanity,
        verdict="blur",
    )
    assert "beats a random map on 1 of 2 metrics (deletion_auc_blur) and is worse on 1 (insertion_auc_blur)" in lines[2]
    assert "gradcam passes over the cohort" in lines[3] and "rank correlation of 0.12" in lines[3]
    assert lines[4].startswith("Flags: artefact_positive") and "up to 0.31" in lines[4]
    assert lines[5] == "Verdict: blur."
