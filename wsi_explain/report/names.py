"""Names, comments and verdicts pathologists give to clusters, saved in the run folder as versioned JSON.

``cohort/cluster_names.json``::

    {"version": 3,
     "names": {"4": "pen ink"}, "comments": {"4": "blue marker on the coverslip"},
     "verdicts": {"4": "pen ink"},
     "history": [{"version": 1, "time": "...", "cluster": 4, "name": "ink", "comment": "",
                  "verdict": "pen ink", "author": ""}, ...]}

A verdict is one of :data:`VERDICTS`; the ones in :data:`ARTEFACT_VERDICTS` mark a cluster as an
artefact, which the reports use (:mod:`wsi_explain.report.verdicts`: what removing those clusters
does to the slide scores and the cohort AUC). Every save increments ``version`` and appends to
``history``, so earlier names and verdicts stay auditable. Files written before verdicts existed
read with no verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

from wsi_explain.core.atomic import atomic_write_json
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import now_iso

__all__ = ["read_cluster_names", "save_cluster_name", "MAX_NAME", "MAX_COMMENT", "VERDICTS", "ARTEFACT_VERDICTS"]

MAX_NAME = 120
MAX_COMMENT = 2000
#: what a pathologist can say a cluster is
VERDICTS = ("biology", "pen ink", "blur", "fold or bubble", "stain or site", "background", "unsure")
#: verdicts that mark a cluster as an artefact (not tissue biology the model should read)
ARTEFACT_VERDICTS = ("pen ink", "blur", "fold or bubble", "stain or site", "background")


def _path(run_path: str | Path) -> Path:
    return Path(run_path) / "cohort" / "cluster_names.json"


def read_cluster_names(run_path: str | Path) -> dict:
    """The whole document (empty one when no name was saved yet)."""
    p = _path(run_path)
    if not p.exists():
        return {"version": 0, "names": {}, "comments": {}, "verdicts": {}, "history": []}
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WsiExplainError(f"{p}: not valid JSON ({exc}); fix or move it away") from exc
    if not isinstance(doc, dict):
        raise WsiExplainError(f"{p}: expected a JSON object")
    if "version" not in doc:  # written by hand: {"names": {...}} or a bare {"3": "name"} mapping
        names = doc["names"] if isinstance(doc.get("names"), dict) else doc
        doc = {
            "version": 0,
            "names": {str(k): str(v) for k, v in names.items()},
            "comments": doc.get("comments", {}),
            "history": [],
        }
    doc.setdefault("comments", {})
    doc.setdefault("verdicts", {})
    doc.setdefault("history", [])
    bad = {k: v for k, v in doc["verdicts"].items() if v not in VERDICTS}
    if bad:
        raise WsiExplainError(f"{p}: unknown verdict(s) {bad}; a verdict is one of {', '.join(VERDICTS)}")
    return doc


def save_cluster_name(
    run_path: str | Path,
    cluster: int,
    name: str,
    comment: str = "",
    *,
    verdict: str | None = None,
    author: str = "",
) -> dict:
    """Set a cluster's name and comment (empty name removes it) and, when given, its verdict (one of
    :data:`VERDICTS`; "" removes it, None keeps the current one); returns the new document."""
    name, comment = str(name).strip(), str(comment).strip()
    if len(name) > MAX_NAME or len(comment) > MAX_COMMENT:
        raise WsiExplainError(f"cluster name (max {MAX_NAME} characters) or comment (max {MAX_COMMENT}) too long")
    if verdict not in (None, "") and verdict not in VERDICTS:
        raise WsiExplainError(f"unknown verdict {verdict!r}; choose one of: {', '.join(VERDICTS)}")
    doc = read_cluster_names(run_path)
    key = str(int(cluster))
    if verdict:
        doc["verdicts"][key] = verdict
    elif verdict == "":
        doc["verdicts"].pop(key, None)
    if name:
        doc["names"][key] = name
    else:
        doc["names"].pop(key, None)
    if comment:
        doc["comments"][key] = comment
    else:
        doc["comments"].pop(key, None)
    doc["version"] = int(doc.get("version", 0)) + 1
    doc["history"].append(
        {
            "version": doc["version"],
            "time": now_iso(),
            "cluster": int(cluster),
            "name": name,
            "comment": comment,
            "verdict": doc["verdicts"].get(key, ""),
            "author": author,
        }
    )
    _path(run_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_path(run_path), doc)
    return doc
