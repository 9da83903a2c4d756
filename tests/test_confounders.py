"""The confounder scan: rank correlation with a bootstrap over slides, on a cohort with a planted
shortcut (ink raises the probability within negative slides) and a null variable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from wsi_explain.metrics.confounders import rank_correlation_by_slide, scan_confounders
from wsi_explain.report.sentences import confounder_sentences


def cohort(n_slides: int = 24, tiles: int = 40, seed: int = 0) -> pd.DataFrame:
    """Half the slides negative; per slide an ink level; within negatives the probability follows
    the ink (plus slide and tile noise); sharpness is unrelated; two sites, unrelated."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_slides):
        label = s % 2
        ink = rng.uniform(0, 0.3)
        slide_effect = rng.normal(0, 0.05)
        for t in range(tiles):
            ink_t = np.clip(ink + rng.normal(0, 0.05), 0, 1)
            base = 0.7 if label else 0.1 + 1.5 * ink_t
            rows.append(
                {
                    "slide_id": f"s{s:02d}",
                    "tile_id": t,
                    "label": label,
                    "site": "A" if s % 4 < 2 else "B",  # one site per slide, unrelated to the label
                    "ink_frac": ink_t,
                    "sharpness": rng.uniform(0.1, 0.5),
                    "prob_pos": float(np.clip(base + slide_effect + rng.normal(0, 0.05), 0, 1)),
                    "cluster": t % 2,
                }
            )
    return pd.DataFrame(rows)


def test_rank_correlation_equals_spearman_and_ignores_tile_order():
    df = cohort()
    r = rank_correlation_by_slide(df["ink_frac"], df["prob_pos"], df["slide_id"], n_boot=200)
    assert r["rho"] == pytest.approx(spearmanr(df["ink_frac"], df["prob_pos"]).statistic, abs=1e-9)
    assert r["n_slides"] == 24 and r["n_tiles"] == len(df) and r["ci_low"] <= r["rho"] <= r["ci_high"]
    perm = np.random.default_rng(1).permutation(len(df))
    r2 = rank_correlation_by_slide(
        df["ink_frac"].to_numpy()[perm], df["prob_pos"].to_numpy()[perm], df["slide_id"].to_numpy()[perm], n_boot=200
    )
    assert r2["rho"] == pytest.approx(r["rho"]) and r2["ci_low"] == pytest.approx(r["ci_low"])
    few = rank_correlation_by_slide(df["ink_frac"], df["prob_pos"], df["slide_id"], n_boot=200, min_slides=30)
    assert np.isnan(few["ci_low"]) and np.isfinite(few["rho"])  # fewer slides than min_slides: no interval


def test_the_scan_names_the_planted_variable_within_the_negative_stratum():
    df = cohort()
    scan, notes = scan_confounders(df, n_boot=300, seed=0)
    cohort_rows = scan[scan.cluster == -2].set_index(["stratum", "variable"])
    ink_neg = cohort_rows.loc[("0", "ink_frac")]
    assert ink_neg["rho"] > 0.6 and ink_neg["ci_low"] > 0.3  # found, with an interval over slides
    assert ink_neg["n_slides"] == 12
    sharp = cohort_rows.loc[("0", "sharpness")]
    assert sharp["ci_low"] < 0 < sharp["ci_high"]  # the null variable is not called
    # the planted variable ranks first among the negative stratum's cohort rows
    neg = scan[(scan.cluster == -2) & (scan.stratum == "0")]
    assert neg.iloc[0]["variable"] == "ink_frac"
    assert {"site=A", "site=B"} <= set(scan["variable"]) and set(scan["cluster"]) == {-2, 0, 1}
    lines = confounder_sentences(scan)
    assert lines[0].startswith("within label 0 slides, the positive probability rises with ink_frac: Spearman 0.")
    assert not any("sharpness" in ln for ln in lines)
    assert notes == []


def test_bad_input_is_said_and_the_rest_is_scanned():
    df = cohort(n_slides=8, tiles=10).drop(columns="label")
    df["scanner"] = "X"  # one scanner: nothing to compare
    df.loc[df.slide_id == "s00", "sharpness"] = np.nan  # a column missing on one slide
    df["flat"] = 1.0
    scan, notes = scan_confounders(df, nuisance=("flat", "stain_batch"), n_boot=50)
    assert any("no slide labels" in n for n in notes) and set(scan["stratum"]) == {"all"}
    assert any("scanner: one value" in n for n in notes) and not scan["variable"].str.startswith("scanner").any()
    assert any("'stain_batch' is not in the cohort table" in n for n in notes)
    assert any("sharpness: missing on 1 slide(s)" in n for n in notes)
    flat = scan[(scan.variable == "flat") & (scan.cluster == -2)].iloc[0]
    assert np.isnan(flat["rho"]) and flat["note"] == "constant in this stratum"
    sharp = scan[(scan.variable == "sharpness") & (scan.cluster == -2)].iloc[0]
    assert sharp["n_slides"] == 7 and np.isfinite(sharp["rho"])  # scanned on the other slides
    assert "ink_frac" in set(scan["variable"])
    two = scan_confounders(cohort(n_slides=2, tiles=10), n_boot=20)[0]
    assert confounder_sentences(two)[0].startswith("too few slides in each label stratum")


def _site_cohort(shift: float, n_slides: int = 12, tiles: int = 15, seed: int = 0):
    rng = np.random.default_rng(seed)
    slides = np.repeat([f"s{i}" for i in range(n_slides)], tiles)
    sites = np.repeat(np.where(np.arange(n_slides) % 2 == 0, "A", "B"), tiles)
    emb = rng.normal(size=(len(slides), 16)) + np.repeat(rng.normal(0, 0.3, (n_slides, 16)), tiles, 0)
    emb[:, :3] += shift * (sites == "A")[:, None]
    return emb, sites, slides


def test_site_probe_reads_a_site_signature_and_not_noise():
    from wsi_explain.metrics.leakage import site_probe

    emb, sites, slides = _site_cohort(shift=2.0)
    hit = site_probe(emb, sites, slides, n_perm=19, n_splits=4)
    assert hit["auroc"] > 0.95 and hit["p_value"] == pytest.approx(1 / 20) and hit["n_sites"] == 2
    assert hit["n_slides"] == 12 and hit["note"] == ""
    null = site_probe(*_site_cohort(shift=0.0, seed=1), n_perm=19, n_splits=4)
    assert null["auroc"] < 0.8 and null["p_value"] > 0.05  # grouped CV on pure noise can fall below 0.5
    one = site_probe(emb, np.full(len(sites), "A"), slides)
    assert np.isnan(one["auroc"]) and one["note"] == "one site in the cohort: no probe"
    few = site_probe(emb[:30], sites[:30], slides[:30])  # two slides, one per site
    assert np.isnan(few["auroc"]) and few["note"].startswith("too few slides per site")


def test_site_probe_folds_keep_every_site_on_both_sides_and_fit_without_warnings():
    """Seven slides from three sites (2, 2 and 3 slides, as in the demo): grouped folds that left a
    site out of a training fold made scikit-learn warn and the AUROC miss that site's column; every
    fold now holds every site in training and test, never splits a slide, and the probe runs
    with warnings raised as errors (the fit converges)."""
    import warnings

    from wsi_explain.metrics.leakage import site_folds, site_probe

    rng = np.random.default_rng(3)
    slide_site = np.array([0, 1, 2, 0, 1, 2, 2])
    g = np.repeat(np.arange(7), 10)
    folds = site_folds(slide_site, g, 2, rng)
    assert len(folds) == 2
    assert np.array_equal(np.sort(np.concatenate([te for _, te in folds])), np.arange(len(g)))
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])  # no slide on both sides
        assert set(slide_site[g[tr]]) == set(slide_site[g[te]]) == {0, 1, 2}
    for bad in (1, 3):  # one fold, or more folds than site 0 has slides: refused
        with pytest.raises(ValueError, match="n_splits"):
            site_folds(slide_site, g, bad, rng)
    emb, _, _ = _site_cohort(shift=0.0, n_slides=7, tiles=20, seed=4)
    slides = np.repeat([f"s{i}" for i in range(7)], 20)
    sites = np.repeat([f"site{i % 3}" for i in range(7)], 20)
    emb[:, :3] += 2.0 * (sites == "site0")[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = site_probe(emb, sites, slides, n_perm=5)
    assert res["n_sites"] == 3 and res["note"] == "" and res["auroc"] > 0.7


def test_site_composition_is_tested_over_slides():
    from wsi_explain.metrics.leakage import site_composition

    _, sites, slides = _site_cohort(shift=0.0)
    clusters = np.where(sites == "A", 0, 1)  # cluster 0: every site-A tile; cluster 1: every site-B tile
    clusters[np.arange(len(sites)) % 3 == 0] = 2  # cluster 2: a third of every slide, mixed sites
    comp = site_composition(clusters, sites, slides, n_perm=200).set_index("cluster")
    assert comp.loc[0, "top_site"] == "A" and comp.loc[0, "share"] == 1.0 and comp.loc[0, "p_value"] < 0.02
    assert comp.loc[2, "tvd"] < 0.05 and comp.loc[2, "p_value"] > 0.2
    assert comp["n_tiles"].sum() == len(sites)
    assert site_composition(clusters, np.full(len(sites), "A"), slides).empty


def test_site_findings_in_words():
    from wsi_explain.metrics.leakage import site_composition, site_probe
    from wsi_explain.report.sentences import leakage_sentences

    emb, sites, slides = _site_cohort(shift=2.0)
    probe = {"site_column": "site", **site_probe(emb, sites, slides, n_perm=9, n_splits=4)}
    clusters = np.where(sites == "A", 0, 1)
    comp = site_composition(clusters, sites, slides, n_perm=100)
    lines = leakage_sentences(probe, comp)
    assert lines[0].startswith("site probe: the tile embeddings predict the site with AUROC 0.9")
    assert "permutation p = 0.100, 12 slides, 2 sites" in lines[0]  # 9 permutations: 1/10 at best
    assert "cluster 0: 100 % of its tiles from site A (cohort 50 %" in lines[1] and len(lines) == 3
    assert leakage_sentences({"auroc": float("nan")}, comp.iloc[:0]) == []


def test_error_ranking_puts_the_failing_cluster_first():
    from wsi_explain.metrics.leakage import error_clusters
    from wsi_explain.report.sentences import error_sentences

    rng = np.random.default_rng(0)
    n = 600
    clusters = np.repeat([0, 1, 2], n // 3)
    labels = rng.integers(0, 2, n).astype(float)
    prob = np.where(labels == 1, 0.9, 0.1)  # right everywhere...
    bad = (clusters == 1) & (labels == 0)
    prob[bad] = 0.8  # ...except negatives of cluster 1: false positives
    labels[:10] = np.nan  # unlabelled tiles are left out
    err = error_clusters(clusters, prob, labels)
    assert err.iloc[0]["cluster"] == 1 and err.iloc[0]["false_pos"] == bad.sum() and err.iloc[0]["false_neg"] == 0
    assert err.iloc[0]["error_share"] == 1.0 and err["n_labelled"].sum() == n - 10
    assert err.iloc[0]["cohort_error_rate"] == pytest.approx(bad.sum() / (n - 10))
    assert err.iloc[0]["excess_errors"] > 0 > err.iloc[-1]["excess_errors"]
    line = error_sentences(err)[0]
    assert (
        line.startswith("where the model fails: cluster 1 holds 100 % of the cohort's errors")
        and len(error_sentences(err)) == 1
    )


def test_slide_errors_name_the_clusters_a_wrong_decision_rests_on():
    """A negative slide whose top tiles are a planted cluster (high probability) is a false
    positive, and that cluster holds its top-k tiles; right slides add nothing; recomputed by hand."""
    import pandas as pd

    from wsi_explain.metrics.leakage import slide_errors
    from wsi_explain.report.sentences import slide_error_sentences

    rng = np.random.default_rng(1)
    rows = []
    for s, lab in enumerate([1, 1, 0, 0, 0]):
        for t in range(30):
            cl = 2 if (s == 4 and t < 10) else t % 2
            p = 0.95 if cl == 2 else (0.8 if lab else 0.1) + 0.05 * rng.random()
            rows.append({"slide_id": f"s{s}", "cluster": cl, "prob_pos": p})
    tiles = pd.DataFrame(rows)
    before = tiles.copy()
    labels = pd.Series({f"s{s}": v for s, v in enumerate([1, 1, 0, 0, 0])} | {"s9": np.nan})
    per_slide, per_cluster = slide_errors(tiles, labels, topk=8)
    pd.testing.assert_frame_equal(tiles, before)
    assert per_slide.set_index("slide_id")["error"].to_dict() == {
        "s0": "",
        "s1": "",
        "s2": "",
        "s3": "",
        "s4": "false positive",
    }
    top = tiles[tiles.slide_id == "s4"].nlargest(8, "prob_pos")
    assert per_slide.set_index("slide_id").at["s4", "score"] == pytest.approx(top["prob_pos"].mean())
    assert per_cluster.to_dict("records") == [{"cluster": 2, "slide_error_topk": 8, "slide_error_share": 1.0}]
    lines = slide_error_sentences(per_slide)
    assert lines[0] == "slide level: 1 of 5 labelled slides wrong (top-8 score called at 0.5)"
    assert lines[1].startswith("slide s4: false positive (score 0.95); its top-8 tiles lie in cluster 2 (8)")
    assert slide_error_sentences(per_slide.assign(error="")) == [
        "slide level: all 5 labelled slides right (top-8 score called at 0.5)"
    ]


def test_cam_weighted_embedding_pools_activations_where_the_map_is(tmp_path):
    """The CAM-weighted embedding is sum(A * cam) / sum(cam) per channel (the plain mean for an all-zero
    map), read from a real features store; a map on another grid gives none; the probe's sentence."""
    import zarr

    from wsi_explain.report.sentences import leakage_sentences
    from wsi_explain.stages.score_confounders import _cam_weighted

    rng = np.random.default_rng(0)
    acts = rng.random((4, 3, 2, 2)).astype(np.float16)
    cams = np.zeros((4, 2, 2), np.float16)
    cams[0, 0, 1] = 1.0  # all weight on one position
    cams[1] = [[1, 3], [0, 0]]
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    g.attrs["methods"] = ["gradcam"]
    for name, arr in (("activations", acts), ("cams/gradcam", cams), ("cams_scale/gradcam", np.ones(4, np.float32))):
        g.create_array(name, shape=arr.shape, dtype=arr.dtype)[:] = arr
    out, method = _cam_weighted(g, np.arange(4))
    a = acts.astype(np.float32)
    assert method == "gradcam" and out.shape == (4, 3)
    np.testing.assert_allclose(out[0], a[0, :, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.25 * a[1, :, 0, 0] + 0.75 * a[1, :, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(out[2], a[2].mean((1, 2)), rtol=1e-6)  # all-zero map: the plain mean
    g2 = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g2.attrs["methods"] = ["gradcam"]
    for name, arr in (("activations", acts), ("cams/gradcam", np.ones((4, 4, 4), np.float16))):
        g2.create_array(name, shape=arr.shape, dtype=arr.dtype)[:] = arr
    g2.create_array("cams_scale/gradcam", shape=(4,), dtype="float32")[:] = 1
    assert _cam_weighted(g2, np.arange(4)) == (None, None)
    probe = {"site_column": "site", "auroc": 0.6, "p_value": 0.3, "n_slides": 8, "n_sites": 2}
    probe["cam_weighted"] = {"method": "gradcam", "auroc": 0.93, "p_value": 0.02}
    lines = leakage_sentences(probe, None)
    assert lines[1] == (
        "site probe on what the model looks at (activations weighted by its gradcam map): AUROC 0.93 "
        "(permutation p = 0.020)"
    )
