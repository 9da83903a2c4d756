"""Metric rows in words, for the CLI summary and the report pages."""

from __future__ import annotations

__all__ = [
    "gain_sentences",
    "confounder_sentences",
    "leakage_sentences",
    "error_sentences",
    "slide_error_sentences",
    "slice_sentences",
    "shortcut_lines",
]


def gain_sentences(rows) -> list[str]:
    """``rows``: a DataFrame of ``cluster_metrics`` rows (method, metric, value, ci_low, ci_high,
    n_tiles). One sentence per method and metric from the ``<metric>_gain_vs_<reference>`` rows of
    ``cluster_metrics`` (one cluster's or the cohort's): better than the reference by X [CI] when
    the interval is above 0, worse when below, else not distinguishable."""
    out = []
    for _, r in rows[rows["metric"].str.contains("_gain_vs_")].iterrows():
        metric, ref = r["metric"].rsplit("_gain_vs_", 1)
        ci = f"{r['value']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] over {r['n_tiles']} tiles"
        if r["ci_low"] > 0:
            verdict = "better than"
        elif r["ci_high"] < 0:
            verdict = "WORSE than"
        else:
            verdict = "not distinguishable from"
        out.append(f"{r['method']}: {metric} {verdict} the {ref} map ({ci})")
    return out


def confounder_sentences(scan, *, cohort_row: int = -2, top: int = 5) -> list[str]:
    """The confounder scan's cohort rows in words, strongest first: the variables whose interval
    (bootstrap over slides) excludes 0, at most ``top``; one sentence saying so when none does."""
    cohort = scan[scan["cluster"] == cohort_row]
    rows = cohort[cohort["ci_low"].notna()]
    if len(cohort) and not len(rows):
        return [
            "too few slides in each label stratum for an interval over slides (3 or more needed); "
            "the estimates are in cohort/confounders.parquet"
        ]
    strong = rows[(rows["ci_low"] > 0) | (rows["ci_high"] < 0)]
    strong = strong.reindex(strong["rho"].abs().sort_values(ascending=False).index).head(top)
    out = []
    for _, r in strong.iterrows():
        where = "over all slides" if r["stratum"] == "all" else f"within label {r['stratum']} slides"
        trend = "rises" if r["rho"] > 0 else "falls"
        out.append(
            f"{where}, the positive probability {trend} with {r['variable']}: Spearman {r['rho']:.2f} "
            f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] over {int(r['n_slides'])} slides"
        )
    if not out and len(rows):
        out.append(
            f"no nuisance variable moves the positive probability beyond chance within a label stratum "
            f"({rows['variable'].nunique()} variables, 95 % intervals over slides)"
        )
    return out


def leakage_sentences(probe: dict | None, composition) -> list[str]:
    """The site-leakage probe and the clusters whose site mix departs from the cohort's (permutation
    p < 0.05 over slides), in words."""
    out = []
    if probe is not None and probe.get("auroc") == probe.get("auroc") and probe.get("auroc") is not None:
        out.append(
            f"site probe: the tile embeddings predict the {probe['site_column']} with AUROC {probe['auroc']:.2f} "
            f"(folds grouped by slide; permutation p = {probe['p_value']:.3f}, {probe['n_slides']} slides, "
            f"{probe['n_sites']} sites)"
        )
        cam = probe.get("cam_weighted") or {}
        if cam.get("auroc") is not None and cam["auroc"] == cam["auroc"]:
            out.append(
                f"site probe on what the model looks at (activations weighted by its {cam['method']} map): "
                f"AUROC {cam['auroc']:.2f} (permutation p = {cam['p_value']:.3f})"
            )
    if composition is not None:
        for _, r in composition[composition["p_value"] < 0.05].iterrows():
            out.append(
                f"cluster {int(r['cluster'])}: {100 * r['share']:.0f} % of its tiles from site {r['top_site']} "
                f"(cohort {100 * r['cohort_share']:.0f} %; permutation p = {r['p_value']:.3f} over slides)"
            )
    return out


def shortcut_lines(cohort_dir) -> list[str] | None:
    """Everything the score stage found about shortcuts, in words: the confounder scan, the site
    probe and composition, and their notes; None when the run has no scan."""
    import json
    from pathlib import Path

    import pandas as pd
    import pyarrow.parquet as pq

    cdir = Path(cohort_dir)
    path = cdir / "confounders.parquet"
    if not path.exists():
        return None
    meta = json.loads(pq.read_schema(path).metadata[b"wsi_explain"])
    lines = confounder_sentences(pd.read_parquet(path), cohort_row=meta["cohort_row"])
    probe = json.loads((cdir / "site_leakage.json").read_text()) if (cdir / "site_leakage.json").exists() else None
    comp = pd.read_parquet(cdir / "site_composition.parquet") if (cdir / "site_composition.parquet").exists() else None
    err = pd.read_parquet(cdir / "error_clusters.parquet") if (cdir / "error_clusters.parquet").exists() else None
    slides = None
    if (cdir / "slide_errors.parquet").exists():
        topk = json.loads(pq.read_schema(cdir / "slide_errors.parquet").metadata[b"wsi_explain"]).get("topk", 8)
        slides = slide_error_sentences(pd.read_parquet(cdir / "slide_errors.parquet"), topk=topk)
    slices = slice_sentences(cdir)
    return slices + lines + leakage_sentences(probe, comp) + error_sentences(err) + (slides or []) + meta["notes"]


def slice_sentences(cohort_dir) -> list[str]:
    """The artefact slices the model leans on (``cohort/artefact_slices.parquet`` of clustering), in words."""
    from pathlib import Path

    import pandas as pd

    path = Path(cohort_dir) / "artefact_slices.parquet"
    if not path.exists():
        return []
    slices = pd.read_parquet(path)
    return [str(r) for r in slices.loc[slices["flagged"], "reason"]]


def slide_error_sentences(per_slide, *, topk: int = 8, top: int = 3) -> list[str]:
    """The misclassified slides (top-k score called at 0.5), at most ``top``, each with the
    clusters its top-k tiles come from; one sentence when every labelled slide is right."""
    import json

    if per_slide is None or not len(per_slide):
        return []
    wrong = per_slide[per_slide["error"] != ""].sort_values("score", key=lambda s: (s - 0.5).abs(), ascending=False)
    if not len(wrong):
        return [f"slide level: all {len(per_slide)} labelled slides right (top-{topk} score called at 0.5)"]
    out = [f"slide level: {len(wrong)} of {len(per_slide)} labelled slides wrong (top-{topk} score called at 0.5)"]
    for _, r in wrong.head(top).iterrows():
        mix = ", ".join(f"cluster {c} ({n})" for c, n in json.loads(r["top_clusters"]).items())
        out.append(f"slide {r['slide_id']}: {r['error']} (score {r['score']:.2f}); its top-{topk} tiles lie in {mix}")
    return out


def error_sentences(errors, *, top: int = 3) -> list[str]:
    """ "Where the model fails": the clusters holding more errors than the cohort's rate predicts,
    most excess first, at most ``top``."""
    if errors is None or not len(errors):
        return []
    out = []
    for _, r in errors[errors["excess_errors"] > 0].head(top).iterrows():
        line = (
            f"where the model fails: cluster {int(r['cluster'])} holds {100 * r['error_share']:.0f} % of the cohort's "
            f"errors ({int(r['false_pos'])} false positives, {int(r['false_neg'])} false negatives; error rate "
            f"{r['error_rate']:.2f} against {r['cohort_error_rate']:.2f} in the cohort)"
        )
        if "removal_effect" in r and r["removal_effect"] == r["removal_effect"]:
            line += f"; removing it moves a slide's top-8 score by up to {r['removal_effect']:.2f}"
        if r.get("slide_error_share", 0) > 0:
            line += f"; it holds {100 * r['slide_error_share']:.0f} % of the wrong slides' top-k tiles"
        out.append(line)
    return out
