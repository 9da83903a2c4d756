"""The clustering package on planted data: mixtures are recovered, prototypes found, shortcuts flagged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

import clustering as C


@pytest.fixture(scope="session")
def mixture():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=6.0, size=(6, 64))
    truth = np.repeat(np.arange(6), 250)
    X = (centres[truth] + rng.normal(size=(len(truth), 64))).astype(np.float32)
    return X, truth


@pytest.fixture(scope="session")
def umap5(mixture):
    X, _ = mixture
    knn = C.knn_graph(X, 15)
    return C.umap_embed(X, knn, n_components=5, n_neighbors=15, min_dist=0.0, seed=0), knn


def test_exact_knn_matches_brute_force(mixture):
    X, _ = mixture
    before = X.copy()
    g = C.knn_graph(X[:400], 10, method="exact")
    d2 = ((X[:400, None] - X[None, :400]) ** 2).sum(-1)
    ref = np.argsort(d2, axis=1, kind="stable")[:, :10]
    assert (g.indices[:, 0] == np.arange(400)).all() and (g.distances[:, 0] == 0).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(g.indices, ref)]) > 0.99
    np.testing.assert_allclose(g.distances[:, 1], np.sqrt(np.sort(d2, 1)[:, 1]), rtol=1e-3)
    np.testing.assert_array_equal(X, before)


def test_ivf_and_hnsw_recall(mixture):
    X, _ = mixture
    exact = C.knn_graph(X, 10, method="exact")
    for method in ("ivf", "hnsw"):
        g = C.knn_graph(X, 10, method=method, seed=0)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(g.indices, exact.indices)])
        assert recall > 0.9, (method, recall)
        assert (g.indices[:, 0] == np.arange(len(X))).all()


def test_umap_uses_our_knn_and_hdbscan_recovers_mixture(mixture, umap5, monkeypatch):
    X, truth = mixture
    Y, knn = umap5
    assert Y.shape == (len(X), 5) and np.isfinite(Y).all()
    res = C.hdbscan_cluster(Y, min_cluster_size=50)
    assert adjusted_rand_score(truth, res.labels) >= 0.9
    assert ((res.outlier_scores >= 0) & (res.outlier_scores <= 1)).all()
    assert ((res.probabilities >= 0) & (res.probabilities <= 1)).all()
    sizes = np.bincount(res.labels[res.labels >= 0])
    assert (np.diff(sizes) <= 0).all()  # renumbered by size
    # UMAP must not redo the neighbour search: make umap's own search fail loudly
    import umap.umap_ as U

    def boom(*a, **k):
        raise AssertionError("umap ran its own nearest-neighbour search")

    monkeypatch.setattr(U, "nearest_neighbors", boom)
    Y2 = C.umap_embed(X, knn, n_components=5, n_neighbors=15, min_dist=0.0, seed=0)
    np.testing.assert_array_equal(Y, Y2)  # and with the same seed it is deterministic


def test_hdbscan_fitted_on_a_sample(umap5, mixture):
    Y, _ = umap5
    _, truth = mixture
    full = C.hdbscan_cluster(Y, min_cluster_size=50)
    sampled = C.hdbscan_cluster(Y, min_cluster_size=30, fit_max=600, seed=1)
    assert sampled.n_fitted == 600 and (sampled.labels >= -1).all()
    assert adjusted_rand_score(truth, sampled.labels) >= 0.9
    again = C.hdbscan_cluster(Y, min_cluster_size=30, fit_max=600, seed=1)
    np.testing.assert_array_equal(sampled.labels, again.labels)
    assert full.n_fitted == len(Y)


def test_hdbscan_guard_against_one_giant_cluster():
    """Nine close blobs and one far one: excess of mass keeps the nine as one cluster (96 % of the
    points); the guard refits with a maximum cluster size and recovers the blobs."""
    import hdbscan

    rng = np.random.default_rng(0)
    centres = [(4.0 * i, 4.0 * j) for i in range(3) for j in range(3)]
    Y = np.concatenate(
        [c + rng.normal(size=(150, 2)) for c in centres] + [np.array([40.0, 40.0]) + rng.normal(size=(60, 2))]
    )
    plain = hdbscan.HDBSCAN(min_cluster_size=20).fit(Y).labels_
    assert np.bincount(plain[plain >= 0]).max() >= 0.9 * len(Y)
    res = C.hdbscan_cluster(Y, min_cluster_size=20)
    assert res.guard and "one cluster" in res.guard
    sizes = np.bincount(res.labels[res.labels >= 0])
    assert len(sizes) >= 8 and sizes.max() <= len(Y) // 2
    truth = np.repeat(np.arange(10), [150] * 9 + [60])
    ok = res.labels >= 0
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth[ok], res.labels[ok]) > 0.8
    assert C.hdbscan_cluster(Y[:-60] / 4.0, min_cluster_size=20).guard is None  # nothing collapsed: no guard


def test_kmeans(mixture):
    X, truth = mixture
    a = C.kmeans_cluster(X, 6, seed=0)
    b = C.kmeans_cluster(X, 6, seed=0)
    assert adjusted_rand_score(truth, a.labels) >= 0.9
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.method == "kmeans" and (a.probabilities <= 1).all() and (a.outlier_scores <= 1).all()


def test_pca_and_normalise(mixture):
    X, _ = mixture
    Z = C.pca_reduce(X, 8)
    assert Z.shape == (len(X), 8)
    N = C.l2_normalise(X)
    np.testing.assert_allclose(np.linalg.norm(N, axis=1), 1, rtol=1e-5)


@pytest.fixture(scope="session")
def planted_concepts():
    rng = np.random.default_rng(1)
    K, Cc, h, w, n = 4, 32, 6, 6, 120
    H = rng.random((K, Cc)) * (rng.random((K, Cc)) < 0.35)
    H /= np.linalg.norm(H, axis=1, keepdims=True)
    maps = rng.gamma(0.5, 1.0, size=(n, K, h, w))
    acts = np.einsum("nkhw,kc->nchw", maps, H) + 0.001 * rng.random((n, Cc, h, w))
    return H.astype(np.float32), maps.astype(np.float32), acts.astype(np.float32)


def test_nmf_recovers_planted_prototypes(planted_concepts):
    H, maps, acts = planted_concepts
    before = acts.copy()
    pos = C.sample_positions(acts, 3000, np.random.default_rng(0))
    model = C.fit_concepts(pos, 4, seed=0)
    cos = model.components @ H.T  # both unit-norm
    r, c = linear_sum_assignment(-cos)
    assert cos[r, c].min() >= 0.95, cos[r, c]
    got = C.concept_maps(acts, model)
    assert got.shape == (len(acts), 4, 6, 6) and (got >= 0).all()
    for i, j in zip(r, c):
        corr = np.corrcoef(got[:, i].ravel(), maps[:, j].ravel())[0, 1]
        assert corr > 0.95
    np.testing.assert_array_equal(acts, before)
    assert model.converged and 0 < model.n_iter < 400


def test_nmf_stopping_at_max_iter_is_recorded_not_warned(planted_concepts, caplog):
    """Stopped by max_iter, the fit says so in its own log line and in the model (n_iter,
    converged), and scikit-learn's ConvergenceWarning does not reach the user; other warnings
    are left alone."""
    import logging
    import warnings

    _, _, acts = planted_concepts
    pos = C.sample_positions(acts, 3000, np.random.default_rng(0))
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="clustering.concepts"):
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        model = C.fit_concepts(pos, 4, seed=0, max_iter=3)
        assert warnings.filters == filters  # the fit's filter does not outlive it
    assert not model.converged and model.n_iter == 3 and "max_iter=3" in caplog.text
    assert not [w for w in seen if "ConvergenceWarning" in type(w.message).__name__]


def test_concept_association_and_cam_correlation(planted_concepts):
    H, maps, acts = planted_concepts
    weights = maps.mean((2, 3))
    pred = (weights[:, 2] > np.median(weights[:, 2])).astype(int)
    assoc = C.concept_prediction_association(weights, pred)
    assert assoc["auc"][2] == pytest.approx(1.0) and np.argmax(np.abs(assoc["coef"])) == 2
    assert assoc["auc_all"] > 0.95
    corr = C.concept_cam_correlation(maps, maps[:, 1])
    assert corr[1] == pytest.approx(1.0) and np.nanmax(np.delete(corr, 1)) < 0.5


def test_off_tissue_fraction():
    cams = np.array([[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    tissue = np.array([[[True, False], [True, True]], [[True, True], [True, True]]])
    out = C.off_tissue_fraction(cams, tissue)
    assert out[0] == pytest.approx(0.75) and np.isnan(out[1])


def _cohort(rng, n_slides=6, per_slide=60):
    rows = []
    for s in range(n_slides):
        for t in range(per_slide):
            cl = t % 3  # three clean clusters spread over all slides
            rows.append(
                {
                    "slide_id": f"s{s}",
                    "tile_id": t,
                    "cluster": cl,
                    "pred": int(rng.random() < 0.3),
                    "site": f"site{s % 2}",
                    "label_pos": float(rng.random() < 0.3),
                }
            )
    df = pd.DataFrame(rows)
    df["pred"] = np.where(df["label_pos"] == 1, 1, df["pred"] * 0)  # clean clusters: predictions follow labels
    df["membership"], df["outlier_score"] = rng.random(len(df)), rng.random(len(df)) * 0.3
    df["prob_pos"] = np.where(df["pred"] == 1, 0.9, 0.1)
    df["confidence"] = np.maximum(df["prob_pos"], 1 - df["prob_pos"])
    df["tissue_frac"], df["ink_frac"], df["cam_off_tissue"] = 0.9, 0.0, 0.1
    return df


def test_planted_shortcut_raises_every_flag():
    rng = np.random.default_rng(2)
    df = _cohort(rng)
    ink = pd.DataFrame(
        {
            "slide_id": "s5",
            "tile_id": np.arange(1000, 1040),
            "cluster": 3,
            "pred": 1,
            "site": "site1",
            "label_pos": 0.0,
            "membership": 0.9,
            "outlier_score": 0.1,
            "prob_pos": 0.97,
            "confidence": 0.97,
            "tissue_frac": 0.45,
            "ink_frac": 0.35,
            "cam_off_tissue": 0.8,
        }
    )
    df = pd.concat([df, ink], ignore_index=True)
    before = df.copy()
    out = C.summarize_clusters(df, space=np.random.default_rng(0).normal(size=(len(df), 2)))
    pd.testing.assert_frame_equal(df, before)
    row = out.set_index("cluster").loc[3]
    assert set(row["flags"]) == {"dominated", "artefact_positive", "off_tissue", "label_disagreement"}
    text = " ".join(row["flag_reasons"])
    assert "slide s5" in text and "pen ink" in text and "background or ink" in text and "labelled tiles agree" in text
    assert row["size"] == 40 and row["slide_dominance"] == 1.0 and row["positive_rate"] == 1.0
    reps = json.loads(row["representatives"])
    assert set(reps) == {"medoid", "most_member", "most_confident", "borderline", "outliers"}
    assert all(r.startswith("s5:") for r in reps["medoid"])
    for cl in (0, 1, 2):
        assert out.set_index("cluster").loc[cl, "flags"] == []


def test_artefact_flag_reads_ink_and_blur_and_needs_the_model_to_lean():
    """Blurred tiles the model calls positive are flagged in words; inked tiles the model ignores
    (no positive excess, no removal effect) are not; an inked cluster whose removal moves a slide's
    score is, even at the cohort's positive rate."""
    rng = np.random.default_rng(4)
    df = _cohort(rng)
    df["sharpness"] = 0.15
    blur = df[df["cluster"] == 0].head(60).copy()
    blur["cluster"], blur["tile_id"], blur["pred"], blur["prob_pos"], blur["sharpness"] = (
        3,
        blur["tile_id"] + 1000,
        1,
        0.9,
        0.03,
    )
    inert = df[df["cluster"] == 1].head(60).copy()
    inert["cluster"], inert["tile_id"], inert["ink_frac"] = 4, inert["tile_id"] + 2000, 0.4
    inert["pred"], inert["prob_pos"] = 0, 0.1
    df = pd.concat([df, blur, inert], ignore_index=True)
    out = C.summarize_clusters(df).set_index("cluster")
    assert "artefact_positive" in out.loc[3, "flags"]
    text = " ".join(out.loc[3, "flag_reasons"])
    assert "100% of its tiles are out of focus (sharpness below 0.06)" in text and "predicted positive" in text
    assert out.loc[3, "blur_tile_share"] == 1.0 and out.loc[3, "mean_sharpness"] == pytest.approx(0.03)
    assert "artefact_positive" not in out.loc[4, "flags"] and out.loc[4, "ink_tile_share"] == 1.0
    leaned = C.summarize_clusters(df, removal={4: 0.25}).set_index("cluster")
    assert "artefact_positive" in leaned.loc[4, "flags"]
    text = " ".join(leaned.loc[4, "flag_reasons"])
    assert "100% of its tiles carry pen ink" in text and "removing it moves a slide's top-k score by up to 0.25" in text


def test_stain_flag_reads_off_range_stain_not_dense_nuclei_and_not_ink():
    """Tiles stained far outside the cohort's range (a shifted H&E) that the model calls positive
    are flagged as a stain artefact; a cluster of dense nuclei (high haematoxylin within the
    cohort's spread) is not; inked tiles, whose optical density is the marker's, do not count."""
    rng = np.random.default_rng(5)
    df = _cohort(rng)
    df["od_h"] = rng.normal(0.30, 0.04, len(df))
    df["od_e"] = rng.normal(0.22, 0.03, len(df))
    shifted = df[df["cluster"] == 0].head(40).copy()
    shifted["cluster"], shifted["tile_id"], shifted["pred"], shifted["prob_pos"] = 3, shifted["tile_id"] + 1000, 1, 0.9
    shifted["od_h"] = shifted["od_h"] * 2.5  # far beyond the quartiles
    nuclei = df[df["cluster"] == 1].head(40).copy()
    nuclei["cluster"], nuclei["tile_id"], nuclei["pred"], nuclei["prob_pos"] = 4, nuclei["tile_id"] + 2000, 1, 0.9
    nuclei["od_h"] = df["od_h"].quantile(0.9)  # dense nuclei: high, within the cohort's range
    inked = shifted.assign(cluster=5, tile_id=shifted["tile_id"] + 2000, ink_frac=0.4)
    df = pd.concat([df, shifted, nuclei, inked], ignore_index=True)
    out = C.summarize_clusters(df).set_index("cluster")
    assert "stain" in out.loc[3, "artefact_kinds"] and "artefact_positive" in out.loc[3, "flags"]
    assert out.loc[3, "stain_tile_share"] >= 0.8
    assert "stained outside the cohort's range" in " ".join(out.loc[3, "flag_reasons"])
    assert out.loc[4, "artefact_kinds"] == [] and "artefact_positive" not in out.loc[4, "flags"]
    assert out.loc[5, "artefact_kinds"] == ["ink"] and out.loc[5, "stain_tile_share"] == 0.0
    for cl in (0, 1, 2):
        assert out.loc[cl, "stain_tile_share"] < 0.05


def test_site_dominance_flag():
    rng = np.random.default_rng(3)
    df = _cohort(rng)
    df.loc[df["cluster"] == 2, "site"] = "scannerB"  # all of cluster 2 from one site (a third of the cohort)
    out = C.summarize_clusters(df).set_index("cluster")
    assert out.loc[2, "flags"] == ["dominated"] and "site scannerB" in out.loc[2, "flag_reasons"][0]
    assert out.loc[0, "flags"] == []
    scanners = df.rename(columns={"site": "scanner"})
    out = C.summarize_clusters(scanners).set_index("cluster")
    assert out.loc[2, "flags"] == ["dominated"] and "scanner scannerB" in out.loc[2, "flag_reasons"][0]


def test_site_flag_reads_the_permutation_test_when_given():
    """With permutation p-values (over slides) the site flag needs p < 0.01 and the largest site 30
    points above its cohort share, not a fixed 90 % share: 57 % from a site that holds 25 % of the
    cohort, at p < 0.01 over slides, is flagged; the same at p = 0.2 is not."""
    from wsi_explain.metrics.leakage import site_composition

    rng = np.random.default_rng(3)
    df = _cohort(rng, n_slides=12)
    sites = np.where(df["slide_id"].str[1:].astype(int) < 3, "B", "A")  # a quarter of the slides at site B
    df["site"] = sites
    df.loc[(df["cluster"] == 2) & (df["site"] == "A") & (df["tile_id"] % 4 != 0), "cluster"] = 1
    out = C.summarize_clusters(df).set_index("cluster")  # no test: the fixed 90 % rule
    share_b = out.loc[2, "site_dominance"]
    assert 0.5 < share_b < 0.9 and "dominated" not in out.loc[2, "flags"]
    comp = site_composition(df["cluster"].to_numpy(), df["site"].to_numpy(), df["slide_id"].to_numpy(), n_perm=200)
    p = dict(zip(comp["cluster"], comp["p_value"]))
    assert p[2] < 0.01 and p[0] > 0.05
    out = C.summarize_clusters(df, site_p=p).set_index("cluster")
    assert out.loc[2, "flags"] == ["dominated"] and "permutation p = 0.0" in out.loc[2, "flag_reasons"][0]
    assert out.loc[0, "flags"] == [] and out.loc[2, "site_p"] == p[2]
    weak = C.summarize_clusters(df, site_p={**p, 2: 0.2}).set_index("cluster")
    assert "dominated" not in weak.loc[2, "flags"]


def test_umap_on_a_sample_places_the_rest(mixture):
    X, truth = mixture
    embs, info = C.umap_cohort(X, n_components=(2, 5), min_dist=(0.1, 0.0), n_neighbors=15, fit_max=600, seed=0)
    assert info["n_fitted"] == 600 and embs[2].shape == (len(X), 2) and embs[5].shape == (len(X), 5)
    res = C.hdbscan_cluster(embs[5], min_cluster_size=30)
    assert adjusted_rand_score(truth, res.labels) >= 0.9
    again, _ = C.umap_cohort(X, n_components=(2,), min_dist=(0.1,), n_neighbors=15, fit_max=600, seed=0)
    np.testing.assert_array_equal(embs[2], again[2])


def test_knn_query(mixture):
    X, _ = mixture
    I, D = C.knn_query(X[:1000], X[1000:1100], 5)
    d2 = ((X[1000:1100, None] - X[None, :1000]) ** 2).sum(-1)
    np.testing.assert_array_equal(I[:, 0], d2.argmin(1))
    np.testing.assert_allclose(D[:, 0], np.sqrt(d2.min(1)), rtol=1e-3)


def test_artefact_slices_find_artefacts_the_clustering_spread_out():
    """Blurred tiles scattered over the three clean clusters (no cluster of their own, so no
    cluster flag) form a slice the model leans on: flagged, in words; inked tiles the model ignores
    form a slice that is not flagged; inputs are not modified."""
    rng = np.random.default_rng(6)
    df = _cohort(rng)
    df["sharpness"] = 0.3
    blur = df.sample(40, random_state=1).index  # spread over clusters 0-2
    df.loc[blur, "sharpness"], df.loc[blur, "pred"] = 0.02, 1
    inked = df.drop(blur).sample(30, random_state=2).index
    df.loc[inked, "ink_frac"], df.loc[inked, "pred"] = 0.3, 0
    before = df.copy()
    out = C.summarize_clusters(df).set_index("cluster")
    assert all("artefact_positive" not in out.loc[c, "flags"] for c in (0, 1, 2))  # no cluster flag ...
    sl = C.artefact_slices(df).set_index("kind")
    pd.testing.assert_frame_equal(df, before)
    assert sl.loc["blur", "flagged"] and sl.loc["blur", "n_tiles"] == 40 and sl.loc["blur", "positive_rate"] == 1.0
    assert sl.loc["blur", "reason"].startswith("the model leans on the out-of-focus tiles wherever they are: 40 tiles")
    assert not sl.loc["ink", "flagged"] and sl.loc["ink", "n_tiles"] == 30 and sl.loc["ink", "reason"] == ""
    masks = C.artefact_masks(df)
    assert masks["blur"].sum() == 40 and masks["ink"].sum() == 30 and "stain" not in masks  # no OD columns


def test_slides_stained_apart_are_found_by_their_median_balance():
    """The slide rule of clustering.staining: one slide of twelve with a shifted H:E balance (a
    different protocol) is found with its ratio and z-score, all its clean tiles count as stained
    outside the range (not its inked ones), a tile-level spread as wide as the shift is not enough
    alone, and fewer than ``stain_min_slides`` slides turn the rule off; inputs are not modified."""
    from clustering.staining import slide_stain_outliers, stain_outliers

    rng = np.random.default_rng(3)
    rows = []
    for s in range(12):
        shift = 0.8 if s == 5 else 0.0  # 1.8x H, 0.8x E moves the balance by ~0.8
        for _ in range(40):  # per tile the balance varies with the tissue (SD 0.45, as on CMU-1)
            rows.append({"slide_id": f"s{s}", "he_p10": rng.normal(shift, 0.45), "ink_frac": 0.0})
    df = pd.DataFrame(rows)
    df["h_p90"], df["e_p90"] = rng.uniform(0.4, 0.8, len(df)), rng.uniform(0.3, 0.5, len(df))
    df.loc[df.index[(df["slide_id"] == "s5")][:5], "ink_frac"] = 0.4
    before = df.copy()
    rules = C.FlagRules()
    apart = slide_stain_outliers(df, rules)
    assert apart["slide_id"].tolist() == ["s5"] and apart["z"].iloc[0] > rules.stain_slide_z
    assert 1.8 < apart["ratio"].iloc[0] < 2.8
    mask = stain_outliers(df, rules)
    on5 = (df["slide_id"] == "s5").to_numpy()
    assert mask[on5].sum() == 35 and not mask[~on5].any()  # 40 tiles, 5 inked
    lean = df.assign(pred=on5.astype(int), label_pos=np.nan, cluster=0)  # the model leans on that slide
    sl = C.artefact_slices(lean).set_index("kind")
    assert sl.loc["stain", "flagged"] and "slides stained apart: s5 (H/E x" in sl.loc["stain", "reason"]
    pd.testing.assert_frame_equal(df, before)
    # the same tiles without the slide structure: no tile is a far-out value
    assert not stain_outliers(df.assign(slide_id="one"), rules).any()
    few = df[df["slide_id"].isin(["s0", "s1", "s2", "s3", "s5"])]
    assert slide_stain_outliers(few, rules).empty
    assert slide_stain_outliers(df.drop(columns="he_p10"), rules).empty


def test_artefact_slices_compare_within_labels():
    """A slice that sits on positive slides is predicted positive because its slides are: with
    labels (``label_pos``) that is no shortcut and the slice is not flagged; the same slice
    predicted positive within negative slides too is flagged, and says so."""
    rng = np.random.default_rng(4)
    df = _cohort(rng)
    df["label_pos"] = (df["slide_id"].astype("category").cat.codes % 2).astype(float)
    df["pred"] = df["label_pos"].astype(int)  # a model that follows the labels
    df["sharpness"] = 0.3
    on_pos = df[df["label_pos"] == 1].sample(40, random_state=0).index
    df.loc[on_pos, "sharpness"] = 0.02  # blurred tiles, all on positive slides
    plain = C.artefact_slices(df.drop(columns="label_pos")).set_index("kind")
    assert plain.loc["blur", "flagged"]  # without labels: 100% positive against ~50%
    sl = C.artefact_slices(df).set_index("kind")
    assert not sl.loc["blur", "flagged"] and sl.loc["blur", "excess"] == 0.0
    on_neg = df[df["label_pos"] == 0].sample(20, random_state=1).index
    df.loc[on_neg, "sharpness"], df.loc[on_neg, "pred"] = 0.02, 1  # now leaned on within the negatives
    sl = C.artefact_slices(df).set_index("kind")
    assert sl.loc["blur", "flagged"] and "within the same labels" in sl.loc["blur", "reason"]


@pytest.mark.parametrize("method", ["exact", "hnsw", "ivf"])
def test_saved_index_finds_the_same_neighbours_as_brute_force(mixture, tmp_path, method):
    """``save_index`` / ``NeighbourIndex``: every kind of index, written and read back, gives each
    row's nearest other rows (itself left out); exact equals brute force, the approximate ones
    nearly (recall >= 0.9 on the mixture)."""
    X, _ = mixture
    used = C.save_index(X, tmp_path / "nn.faiss", method=method, seed=0)
    assert used == method and not (tmp_path / "nn.faiss.tmp").exists()
    index = C.NeighbourIndex(tmp_path / "nn.faiss")
    assert len(index) == len(X)
    rows = np.array([0, 17, len(X) - 1])
    I, D = index.similar(rows, 10)
    d2 = ((X[rows, None] - X[None]) ** 2).sum(-1)
    d2[np.arange(3), rows] = np.inf  # itself left out
    truth = np.argsort(d2, axis=1)[:, :10]
    assert not (I == rows[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, truth)])
    if method == "exact":
        np.testing.assert_array_equal(I, truth)
        np.testing.assert_allclose(D, np.sqrt(np.take_along_axis(d2, truth, 1)), rtol=1e-3)
    else:
        assert recall >= 0.9, recall
    with pytest.raises(IndexError, match=f"the index holds {len(X)} rows"):
        index.similar([len(X)], 5)
