"""Finding slides (files, folders, a cohort CSV), naming them and fingerprinting them."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from wsi_explain.core.errors import SlideListError

__all__ = ["SlideSource", "SLIDE_SUFFIXES", "discover_slides", "safe_slide_id", "slide_fingerprint"]

logger = logging.getLogger(__name__)

#: File suffixes taken from a folder (OpenSlide formats plus plain images).
SLIDE_SUFFIXES = frozenset(
    {
        ".svs",
        ".tif",
        ".tiff",
        ".ndpi",
        ".vms",
        ".vmu",
        ".scn",
        ".mrxs",
        ".bif",
        ".svslide",
        ".dcm",
        ".png",
        ".jpg",
        ".jpeg",
    }
)
_MIB = 1 << 20


@dataclass(frozen=True)
class SlideSource:
    """One slide of a batch.

    Attributes
    ----------
    path : Path
        Absolute path (may not exist: that is reported per slide, not for the batch).
    slide_id : str
        Unique, file-name-safe id (the file stem by default).
    mpp : float or None
        Level-0 µm per pixel overriding the file's.
    annotations : Path or None
        QuPath GeoJSON of this slide.
    label_mask : Path or None
        Label-mask image of this slide (class index per pixel).
    meta : dict
        Other cohort CSV columns (label, site...), as strings.
    """

    path: Path
    slide_id: str
    mpp: float | None = None
    annotations: Path | None = None
    label_mask: Path | None = None
    meta: dict = field(default_factory=dict, compare=False)


def safe_slide_id(name: str) -> str:
    """File-name-safe id: letters, digits, ``.``, ``_`` and ``-``; never empty or hidden."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return out or "slide"


def _unique(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    taken = set()
    for i in ids:
        base = i
        n = seen.get(base, 0)
        cand = base if n == 0 else f"{base}-{n + 1}"
        while cand in taken:
            n += 1
            cand = f"{base}-{n + 1}"
        seen[base] = n + 1
        taken.add(cand)
        out.append(cand)
    return out


def _float(v: str | None, where: str) -> float | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        return float(v)
    except ValueError as exc:
        raise SlideListError(f"{where}: mpp {v!r} is not a number") from exc


def _read_csv(path: Path, mpp: float | None) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        key = next((c for c in ("path", "slide_path", "slide", "file") if c in cols), None)
        if key is None:
            raise SlideListError(f"{path}: the cohort CSV needs a 'path' (or 'slide') column; it has {cols}")
        rows = []
        for i, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            if not row.get(key):
                raise SlideListError(f"{path}, line {i}: empty slide path")
            p = Path(row.pop(key))
            if not p.is_absolute():
                p = (path.parent / p).resolve()
            ann = row.pop("annotations", "") or None
            msk = row.pop("label_mask", "") or row.pop("mask", "") or None
            rows.append(
                {
                    "path": p,
                    "slide_id": row.pop("slide_id", "") or None,
                    "mpp": _float(row.pop("mpp", None), f"{path}, line {i}") or mpp,
                    "annotations": (path.parent / ann).resolve() if ann else None,
                    "label_mask": (path.parent / msk).resolve() if msk else None,
                    "meta": row,
                }
            )
        return rows


def discover_slides(inputs: list[str | Path], *, mpp: float | None = None) -> list[SlideSource]:
    """Expand files, folders (their slide files, sorted) and cohort CSVs into slide sources.

    A path that does not exist is kept (so that the batch records it as failed); a folder with no
    slide file or a CSV without a path column raises :class:`SlideListError`.

    Parameters
    ----------
    inputs : list of paths
    mpp : float, optional
        Level-0 µm per pixel for every slide (a CSV's ``mpp`` column wins).

    Returns
    -------
    list of SlideSource with unique ``slide_id`` (the CSV's ``slide_id`` column, else the stem).
    """
    rows: list[dict] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise SlideListError(f"{p}: folder contains no slide file ({', '.join(sorted(SLIDE_SUFFIXES))})")
            rows += [{"path": f.resolve(), "mpp": mpp} for f in found]
        elif p.suffix.lower() == ".csv" and p.is_file():
            rows += _read_csv(p, mpp)
        else:
            rows.append({"path": p.resolve(), "mpp": mpp})
    if not rows:
        raise SlideListError("no slides given")
    ids = _unique([safe_slide_id(r.get("slide_id") or r["path"].stem) for r in rows])
    return [
        SlideSource(
            path=r["path"],
            slide_id=i,
            mpp=r.get("mpp"),
            annotations=r.get("annotations"),
            label_mask=r.get("label_mask"),
            meta=r.get("meta", {}),
        )
        for r, i in zip(rows, ids)
    ]


def slide_fingerprint(path: str | Path, *, properties: dict | None = None) -> str:
    """A cheap, content-sensitive fingerprint of a slide file.

    sha256 of: file size, mtime (ns), the first and last MiB of the file and, when given, the
    slide's properties (sorted JSON). A full hash of a multi-GB slide would be too slow.

    Raises
    ------
    FileNotFoundError
    """
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_MIB))
        if st.st_size > _MIB:
            fh.seek(max(st.st_size - _MIB, _MIB))
            h.update(fh.read(_MIB))
    if properties:
        h.update(json.dumps(properties, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]
