"""Cluster verdicts: export, import, comparison between two readers, and what they mean for the audit.

A verdict (:data:`wsi_explain.report.names.VERDICTS`) is saved per cluster in
``cohort/cluster_names.json`` beside its name and comment. This module:

- exports a run's names, comments and verdicts to a JSON file (:func:`export_verdicts`), so that a
  second pathologist can judge the same clusters, and imports such a file back
  (:func:`import_verdicts`: each cluster a new version in the history, the file named as author);
- compares two readers' verdicts (:func:`compare_verdicts`: agreement and Cohen's kappa over the
  clusters both judged, the disagreements listed);
- says in words what the verdicts mean for the slide decisions (:func:`effect_sentence`, of
  :func:`wsi_explain.stages.report.verdict_effect`: the clusters marked as artefacts removed
  together from every slide, the cohort AUC before and after and the slides whose score moves most).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from wsi_explain.core.atomic import atomic_write_json
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import now_iso
from wsi_explain.report.names import ARTEFACT_VERDICTS, VERDICTS, read_cluster_names, save_cluster_name

__all__ = ["export_verdicts", "import_verdicts", "compare_verdicts", "effect_sentence", "artefact_clusters"]

FORMAT = "wsi-explain cluster verdicts"


def export_verdicts(run_path: str | Path, out: str | Path) -> Path:
    """Write the run's cluster names, comments and verdicts (and their history) to ``out`` (JSON)."""
    doc = read_cluster_names(run_path)
    keys = sorted({*doc["names"], *doc["comments"], *doc["verdicts"]}, key=int)
    payload = {
        "format": FORMAT,
        "run": Path(run_path).name,
        "exported": now_iso(),
        "version": doc["version"],
        "clusters": {
            k: {
                "name": doc["names"].get(k, ""),
                "comment": doc["comments"].get(k, ""),
                "verdict": doc["verdicts"].get(k, ""),
            }
            for k in keys
        },
        "history": doc["history"],
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, payload)
    return out


def _read_export(path: str | Path) -> dict:
    """The ``clusters`` mapping of an exported file, validated (names the file in every error)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WsiExplainError(f"{p}: not a readable JSON file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("clusters"), dict):
        raise WsiExplainError(f"{p}: not a verdicts file (written by `wsi-explain verdicts RUN --export`)")
    out = {}
    for k, v in doc["clusters"].items():
        try:
            c = int(k)
        except ValueError:
            raise WsiExplainError(f"{p}: cluster {k!r} is not a cluster number") from None
        verdict = (v or {}).get("verdict", "")
        if verdict and verdict not in VERDICTS:
            raise WsiExplainError(
                f"{p}: cluster {c} has an unknown verdict {verdict!r} (one of: {', '.join(VERDICTS)})"
            )
        out[c] = {"name": str(v.get("name", "")), "comment": str(v.get("comment", "")), "verdict": verdict}
    return out


def import_verdicts(run_path: str | Path, path: str | Path, *, clusters=None) -> dict:
    """Apply an exported file's names, comments and verdicts to the run, cluster by cluster (each
    one a new version in the history, authored by the file's name); returns the new document.

    ``clusters`` (the run's cluster ids) rejects a file naming a cluster the run does not have,
    before anything is written."""
    entries = _read_export(path)
    if clusters is not None:
        unknown = sorted(set(entries) - {int(c) for c in clusters})
        if unknown:
            raise WsiExplainError(f"{path}: cluster(s) {unknown} are not clusters of {Path(run_path).name}")
    doc = read_cluster_names(run_path)
    for c, e in sorted(entries.items()):
        doc = save_cluster_name(
            run_path, c, e["name"], e["comment"], verdict=e["verdict"], author=f"import:{Path(path).name}"
        )
    return doc


def compare_verdicts(a: dict, b: dict) -> tuple[pd.DataFrame, dict]:
    """Compare two readers' verdicts.

    Parameters
    ----------
    a, b : dict cluster -> verdict (str; "" or missing = not judged)

    Returns
    -------
    table : one row per cluster judged by either: ``cluster``, ``a``, ``b``, ``agree`` (bool; NaN
        when one did not judge it).
    summary : ``n_both`` (judged by both), ``agreement`` (share of those with the same verdict),
        ``kappa`` (Cohen's, NaN with fewer than 2 clusters or a single verdict throughout).
    """
    a = {int(k): v for k, v in a.items() if v}
    b = {int(k): v for k, v in b.items() if v}
    rows = [{"cluster": c, "a": a.get(c, ""), "b": b.get(c, "")} for c in sorted(set(a) | set(b))]
    table = pd.DataFrame(rows, columns=["cluster", "a", "b"])
    both = table[(table["a"] != "") & (table["b"] != "")]
    table["agree"] = [(x == y) if x and y else float("nan") for x, y in zip(table["a"], table["b"])]
    n = len(both)
    agreement = float((both["a"] == both["b"]).mean()) if n else float("nan")
    kappa = float("nan")
    if n >= 2 and len(set(both["a"]) | set(both["b"])) > 1:
        from sklearn.metrics import cohen_kappa_score

        kappa = float(cohen_kappa_score(both["a"], both["b"]))
    return table, {"n_both": n, "agreement": agreement, "kappa": kappa}


def artefact_clusters(run_path: str | Path) -> dict[int, str]:
    """cluster -> verdict of the clusters marked as artefacts (:data:`ARTEFACT_VERDICTS`)."""
    doc = read_cluster_names(run_path)
    return {int(k): v for k, v in doc["verdicts"].items() if v in ARTEFACT_VERDICTS}


def _auc_words(e: dict, agg: str, label: str) -> str:
    before, after = e.get(f"auc_{agg}_before"), e.get(f"auc_{agg}_after")
    if before is None or pd.isna(before):
        return ""
    after_txt = "undefined" if pd.isna(after) else f"{after:.3f}"
    return f"moves the cohort AUC ({label}) from {before:.3f} to {after_txt}"


def effect_sentence(e: dict | None, names: dict | None = None, *, at_most: int = 5) -> str:
    """The verdicts' effect in words ("" without one)."""
    if not e:
        return ""
    names = names or {}
    which = ", ".join(f"{names.get(c, f'cluster {c}')} ({v})" for c, v in sorted(e["clusters"].items()))
    auc = _auc_words(e, "topk", f"top-{e['topk']} score") or "changes no AUC (the slides have no labels)"
    moved = [s for s in e["slides"] if pd.notna(s["d_topk"])][:at_most]
    slides = ", ".join(f"{s['slide_id']} {s['topk_before']:.2f} -> {s['topk_after']:.2f}" for s in moved)
    text = f"Removing the clusters marked as artefacts ({which}; {e['n_tiles']} tiles on {e['n_slides']} slides) {auc}"
    if slides:
        text += f"; the slides' top-{e['topk']} scores move most on {slides}"
    if e["n_emptied"]:
        text += f"; {e['n_emptied']} slide(s) keep no tile and lose their score"
    return text + "."
