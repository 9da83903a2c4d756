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
