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
