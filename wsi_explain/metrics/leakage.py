"""Site leakage: can the site (provider, scanner) be read from the model's embeddings, and are
clusters made of one site more than the cohort's mix explains? And where the model fails: which
clusters hold its errors (:func:`error_clusters`).

Both tests respect that tiles of a slide are not independent: the probe's folds are grouped by
slide and its permutation test shuffles sites across slides; the composition test permutes the
slides' sites too.
"""

from __future__ import annotations

import numpy as np

__all__ = ["site_probe", "site_folds", "site_composition", "error_clusters", "slide_errors"]


def _codes(sites, slides) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes of the sites (as strings) and slides per tile, and the site names."""
    import pandas as pd

    site_codes, site_names = pd.factorize(pd.Series(sites).astype(str))
    return site_codes, np.asarray(site_names), pd.factorize(pd.Series(slides))[0]


def _slide_sites(sites: np.ndarray, slide_codes: np.ndarray) -> np.ndarray:
    """The site code of each slide (its first tile's), (n_slides,)."""
    out = np.full(slide_codes.max() + 1, -1, np.int64)
    out[slide_codes[::-1]] = sites[::-1]
    return out


def site_folds(slide_site: np.ndarray, groups: np.ndarray, n_splits: int, rng: np.random.Generator) -> list:
    """Grouped, site-stratified folds: each site's slides, shuffled, are dealt to the folds in turn
    (continuing where the previous site stopped, so the folds stay even).

    Parameters
    ----------
    slide_site : (n_slides,) int site code of each slide.
    groups : (N,) int slide code of each tile.
    n_splits : int, at most the fewest slides of any site (and >= 2).
    rng : the generator of the shuffles.

    Returns
    -------
    list of (train, test) tile index arrays. No slide is split, every test fold holds at least one
    slide of every site, and with two or more slides per site every training fold does too, so no
    fold's classifier misses a site (as scikit-learn's ``GroupKFold`` can, which it warns about).
    """
    per_site = np.bincount(slide_site)
    fewest = int(per_site[per_site > 0].min())
    if not 2 <= n_splits <= fewest:
        raise ValueError(f"n_splits must be between 2 and the fewest slides of any site ({fewest}), got {n_splits}")
    fold_of = np.empty(len(slide_site), np.int64)
    start = 0
    for s in np.unique(slide_site):
        members = rng.permutation(np.flatnonzero(slide_site == s))
        fold_of[members] = (start + np.arange(len(members))) % n_splits
        start += len(members)
    tile_fold = fold_of[groups]
    return [(np.flatnonzero(tile_fold != f), np.flatnonzero(tile_fold == f)) for f in range(n_splits)]


def _cv_auroc(x: np.ndarray, y: np.ndarray, folds: list, seed: int) -> float:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(32, x.shape[1], max(2, len(x) // 4))
    # whitened components: a well-conditioned problem that L-BFGS solves (unwhitened, the leading
    # components' variance in the hundreds left it unconverged at 300 iterations)
    model = make_pipeline(StandardScaler(), PCA(k, whiten=True, random_state=seed), LogisticRegression(max_iter=1000))
    prob = cross_val_predict(model, x, y, cv=folds, method="predict_proba")
    if prob.shape[1] == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))


def site_probe(
    embeddings: np.ndarray,
    sites: np.ndarray,
    slides: np.ndarray,
    *,
    n_splits: int = 5,
    n_perm: int = 50,
    per_slide: int = 20,
    seed: int = 0,
) -> dict:
    """Cross-validated AUROC of a logistic regression predicting the site from the embeddings.

    Parameters
    ----------
    embeddings : (N, D) float, one row per tile.
    sites : (N,) site of each tile's slide (any hashable values).
    slides : (N,) slide ids: the folds never split a slide (:func:`site_folds`).
    n_splits : int, keyword-only
        Folds; at most the fewest slides of any site, so that every fold has every site on both
        sides.
    n_perm : int
        Permutations for the p-value: the slides' sites are shuffled (each slide keeps one site,
        the number of slides per site is kept) and the whole cross-validation is rerun.
    per_slide : int
        Tiles per slide used (a seeded sample; all when fewer), standardised, reduced by PCA to
        32 whitened components.

    Returns
    -------
    dict: ``auroc`` (macro one-vs-rest with 3+ sites; 0.5 = no site signal), ``p_value``
    ((1 + permutations at or above) / (1 + n_perm)), ``n_slides``, ``n_sites``, ``n_tiles``, and
    ``note`` (why there is no probe: one site, too few slides per site).
    """
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    site_codes, site_names, slide_codes = _codes(sites, slides)
    out = {"auroc": np.nan, "p_value": np.nan, "n_slides": int(slide_codes.max() + 1), "n_sites": len(site_names)}
    out["n_tiles"], out["note"] = 0, ""
    per_site = np.bincount(_slide_sites(site_codes, slide_codes), minlength=len(site_names))
    if len(site_names) < 2:
        out["note"] = "one site in the cohort: no probe"
        return out
    if per_site.min() < 2 or out["n_slides"] < 4:
        out["note"] = f"too few slides per site for grouped folds ({dict(zip(site_names, per_site.tolist()))})"
        return out
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(slide_codes == s))[:per_slide] for s in range(out["n_slides"])]
    )
    x, y, g = np.asarray(embeddings, np.float64)[keep], site_codes[keep], slide_codes[keep]
    k = int(min(n_splits, per_site.min()))  # every site in every fold, test and training
    out["n_tiles"] = len(keep)
    slide_site = _slide_sites(y, g)
    out["auroc"] = _cv_auroc(x, y, site_folds(slide_site, g, k, rng), seed)
    null = []
    for _ in range(n_perm):
        perm = rng.permutation(slide_site)
        null.append(_cv_auroc(x, perm[g], site_folds(perm, g, k, rng), seed))
    out["p_value"] = float((1 + np.sum(np.asarray(null) >= out["auroc"] - 1e-12)) / (1 + n_perm))
    return out


def site_composition(clusters: np.ndarray, sites: np.ndarray, slides: np.ndarray, *, n_perm: int = 1000, seed: int = 0):
    """Per cluster: its most common site, that site's share in the cluster and in the cohort, the
    total-variation distance between the cluster's site mix and the cohort's, and a permutation
    p-value for that distance (sites shuffled across slides, so a cluster made of one big slide is
    not called site-specific by its tile count alone).

    Returns a DataFrame (cluster, top_site, share, cohort_share, tvd, p_value, n_tiles); empty with
    fewer than 2 sites.
    """
    import pandas as pd

    site_codes, site_names, slide_codes = _codes(sites, slides)
    cl_codes, cl_names = pd.factorize(pd.Series(clusters), sort=True)
    cols = ["cluster", "top_site", "share", "cohort_share", "tvd", "p_value", "n_tiles"]
    n_s, n_c = len(site_names), len(cl_names)
    if n_s < 2:
        return pd.DataFrame(columns=cols)

    def tvd(site_of_tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counts = np.bincount(cl_codes * n_s + site_of_tile, minlength=n_c * n_s).reshape(n_c, n_s)
        share = counts / counts.sum(1, keepdims=True)
        return 0.5 * np.abs(share - counts.sum(0) / counts.sum()).sum(1), share

    observed, share = tvd(site_codes)
    slide_site = _slide_sites(site_codes, slide_codes)
    rng = np.random.default_rng(seed)
    above = np.zeros(n_c)
    for _ in range(n_perm):
        above += tvd(rng.permutation(slide_site)[slide_codes])[0] >= observed - 1e-12
    cohort = np.bincount(site_codes, minlength=n_s) / len(site_codes)
    top = share.argmax(1)
    return pd.DataFrame(
        {
            "cluster": cl_names,
            "top_site": site_names[top],
            "share": share[np.arange(n_c), top],
            "cohort_share": cohort[top],
            "tvd": observed,
            "p_value": (1 + above) / (1 + n_perm),
            "n_tiles": np.bincount(cl_codes, minlength=n_c),
        },
        columns=cols,
    )


def error_clusters(clusters: np.ndarray, prob: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5):
    """Where the model fails: per cluster, its labelled tiles' errors against the cohort's.

    Parameters
    ----------
    clusters : (N,) cluster ids.
    prob : (N,) positive probability; a tile is called positive at ``prob >= threshold``.
    labels : (N,) 1/0 (positive or not; tile annotation or slide label), NaN = unlabelled (left out).

    Returns
    -------
    DataFrame, one row per cluster with labelled tiles, ranked by ``excess_errors`` (errors beyond
    what the cohort's error rate predicts for the cluster's labelled tiles; the clusters that hold
    the model's failures first): cluster, n_labelled, n_errors, false_pos, false_neg, error_rate,
    cohort_error_rate, error_share (of the cohort's errors), excess_errors.
    """
    import pandas as pd

    y = np.asarray(labels, np.float64)
    keep = np.isfinite(y)
    c, pred, y = np.asarray(clusters)[keep], np.asarray(prob, np.float64)[keep] >= threshold, y[keep] > 0.5
    df = pd.DataFrame({"cluster": c, "fp": pred & ~y, "fn": ~pred & y})
    g = df.groupby("cluster").agg(n_labelled=("fp", "size"), false_pos=("fp", "sum"), false_neg=("fn", "sum"))
    g["n_errors"] = g["false_pos"] + g["false_neg"]
    total = max(int(g["n_errors"].sum()), 0)
    rate = total / max(len(df), 1)
    g["error_rate"] = g["n_errors"] / g["n_labelled"]
    g["cohort_error_rate"] = rate
    g["error_share"] = g["n_errors"] / total if total else 0.0
    g["excess_errors"] = g["n_errors"] - rate * g["n_labelled"]
    cols = ["n_labelled", "n_errors", "false_pos", "false_neg", "error_rate", "cohort_error_rate", "error_share"]
    return g.reset_index()[["cluster"] + cols + ["excess_errors"]].sort_values("excess_errors", ascending=False)


def slide_errors(tiles, slide_labels, *, topk: int = 8, threshold: float = 0.5):
    """Slide-level errors and the clusters their decisions rest on.

    The slide score is the mean of its ``topk`` highest positive probabilities (the cluster
    removal's aggregate); a slide is called positive at ``score >= threshold``. For a misclassified
    slide, the clusters of the tiles that make its score (its top k) are where the wrong decision
    comes from.

    Parameters
    ----------
    tiles : DataFrame with slide_id, cluster, prob_pos (not modified).
    slide_labels : Series slide_id -> 1 / 0 (NaN or missing: unlabelled, left out).

    Returns
    -------
    (per_slide, per_cluster): per_slide has slide_id, label, score, error ("false positive",
    "false negative" or ""), top_clusters (JSON {cluster: tiles among the top k}); per_cluster has
    cluster, slide_error_topk (top-k tiles of misclassified slides in the cluster) and
    slide_error_share (their share of all such tiles), most first.
    """
    import json

    import pandas as pd

    lab = pd.Series(slide_labels, dtype=float)
    t = tiles[tiles["slide_id"].isin(lab[lab.notna()].index)]
    rows, counts = [], {}
    for sid, g in t.groupby("slide_id", sort=True):
        top = g.nlargest(min(topk, len(g)), "prob_pos")
        score, y = float(top["prob_pos"].mean()), bool(lab[sid] > 0.5)
        err = "" if (score >= threshold) == y else ("false negative" if y else "false positive")
        mix = top["cluster"].value_counts()
        if err:
            for c, n in mix.items():
                counts[int(c)] = counts.get(int(c), 0) + int(n)
        rows.append(
            {
                "slide_id": sid,
                "label": int(y),
                "score": score,
                "error": err,
                "top_clusters": json.dumps({str(int(c)): int(n) for c, n in mix.items()}),
            }
        )
    per_slide = pd.DataFrame(rows, columns=["slide_id", "label", "score", "error", "top_clusters"])
    total = sum(counts.values())
    per_cluster = pd.DataFrame(
        {
            "cluster": list(counts),
            "slide_error_topk": list(counts.values()),
            "slide_error_share": [v / total for v in counts.values()],
        },
        columns=["cluster", "slide_error_topk", "slide_error_share"],
    ).sort_values("slide_error_topk", ascending=False, kind="stable")
    return per_slide, per_cluster.reset_index(drop=True)
