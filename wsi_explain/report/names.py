"""Names and comments pathologists give to clusters, saved in the run folder as versioned JSON.

``cohort/cluster_names.json``::

    {"version": 3,
     "names": {"4": "pen ink"}, "comments": {"4": "blue marker on the coverslip"},
     "history": [{"version": 1, "time": "...", "cluster": 4, "name": "ink", "comment": ""}, ...]}

Every save increments ``version`` and appends to ``history``, so earlier names stay auditable.
Reports and exports read the current names.
"""

from __future__ import annotations

import json
from pathlib import Path

from wsi_explain.core.atomic import atomic_write_json
from wsi_explain.core.errors import WsiExplainError
from wsi_explain.core.run import now_iso

__all__ = ["read_cluster_names", "save_cluster_name", "MAX_NAME", "MAX_COMMENT"]

MAX_NAME = 120
MAX_COMMENT = 2000


def _path(run_path: str | Path) -> Path:
    return Path(run_path) / "cohort" / "cluster_names.json"


def read_cluster_names(run_path: str | Path) -> dict:
    """The whole document (empty one when no name was saved yet)."""
    p = _path(run_path)
    if not p.exists():
        return {"version": 0, "names": {}, "comments": {}, "history": []}
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
    doc.setdefault("history", [])
    return doc


def save_cluster_name(run_path: str | Path, cluster: int, name: str, comment: str = "", *, author: str = "") -> dict:
    """Set a cluster's name and comment (empty name removes it); returns the new document."""
    name, comment = str(name).strip(), str(comment).strip()
    if len(name) > MAX_NAME or len(comment) > MAX_COMMENT:
        raise WsiExplainError(f"cluster name (max {MAX_NAME} characters) or comment (max {MAX_COMMENT}) too long")
    doc = read_cluster_names(run_path)
    key = str(int(cluster))
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
            "author": author,
        }
    )
    _path(run_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_path(run_path), doc)
    return doc
