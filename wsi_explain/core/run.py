"""The run folder and its manifest.

A run folder holds one audit: ``manifest.json``, ``slides/<id>/...``, ``cohort/...``,
``report/...``. The manifest records, per stage and per slide, the status, the params hash,
the input fingerprint, the outputs, timings and the error text. Writes are atomic; one process
at a time may open a run for writing (a lock file).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from wsi_explain.core.atomic import atomic_write_json
from wsi_explain.core.errors import ManifestError, RunLockedError

__all__ = ["RunFolder", "SCHEMA_VERSION", "STAGES", "params_hash", "package_versions", "now_iso"]

# the stages, in pipeline order: their names in the manifest (each stage module sets STAGE to one)
STAGES = ("tile", "extract", "cluster", "score", "report")

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_VERSIONED = ("wsi_explain", "numpy", "pandas", "pyarrow", "openslide", "torch", "zarr", "tifffile", "scikit-image")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def params_hash(params: Any) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of ``params``."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results (only those installed)."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    from importlib import metadata

    names = {"wsi_explain": "wsi-explain", "openslide": "openslide-python", "scikit-image": "scikit-image"}
    out = {"python": platform.python_version()}
    for mod in _VERSIONED:
        try:
            out[mod] = metadata.version(names.get(mod, mod))
        except metadata.PackageNotFoundError:
            continue
    try:
        import openslide

        out["libopenslide"] = openslide.__library_version__
    except Exception:  # the library itself is missing: nothing to record
        pass
    return out


class RunFolder:
    """A run folder opened for writing.

    Parameters
    ----------
    path : str or Path
        The folder (created if missing).
    readonly : bool
        Open without taking the lock (``status``, reports of finished runs); ``save`` is refused.

    Raises
    ------
    RunLockedError
        Another process has the run open for writing.
    ManifestError
        ``manifest.json`` is unreadable or of a newer schema.

    Examples
    --------
    >>> with RunFolder("runs/a") as run:                       # doctest: +SKIP
    ...     if not run.is_done("tile", "s1", params="ab12", fingerprint="ff"):
    ...         ...
    ...         run.record("tile", "s1", status="done", params="ab12", fingerprint="ff")
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.readonly = readonly
        self._lock_fh = None
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
        elif not self.path.is_dir():
            raise ManifestError(f"{self.path}: run folder does not exist")
        self.manifest = self._load()

    # -- lock -------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        lock = self.path / ".lock"
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            msg = (
                f"{self.path}: run folder is in use by another process (pid {holder}); "
                "wait for it to finish or choose another --out"
            )
            raise RunLockedError(msg) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def close(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- manifest -----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def _load(self) -> dict:
        p = self.manifest_path
        if not p.exists():
            return {"schema_version": SCHEMA_VERSION, "created": now_iso(), "config": {}, "stages": {}}
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{p}: manifest is unreadable ({exc}); move it away to start the run afresh") from exc
        v = m.get("schema_version")
        if not isinstance(v, int) or v > SCHEMA_VERSION:
            raise ManifestError(f"{p}: manifest schema {v!r} is not supported (this version reads {SCHEMA_VERSION})")
        m.setdefault("stages", {})
        m.setdefault("config", {})
        return m

    def save(self) -> None:
        """Write ``manifest.json`` atomically."""
        if self.readonly:
            raise ManifestError(f"{self.path}: opened read-only")
        self.manifest["updated"] = now_iso()
        atomic_write_json(self.manifest_path, self.manifest)

    def set_config(self, section: str, config: dict) -> None:
        self.manifest["config"][section] = config

    def stage(self, name: str) -> dict:
        """The manifest entry of a stage (created empty when missing)."""
        return self.manifest["stages"].setdefault(name, {"slides": {}})

    def slide_record(self, stage: str, slide_id: str) -> dict | None:
        return self.stage(stage)["slides"].get(slide_id)

    def is_done(self, stage: str, slide_id: str, *, params: str, fingerprint: str | None) -> bool:
        """True when the slide finished this stage with the same params and input, and its outputs exist."""
        rec = self.slide_record(stage, slide_id)
        if not rec or rec.get("status") != "done":
            return False
        if rec.get("params") != params or rec.get("fingerprint") != fingerprint:
            return False
        return all((self.path / o).exists() for o in rec.get("outputs", []))

    def record(self, stage: str, slide_id: str, *, save: bool = True, **fields: Any) -> dict:
        """Replace a slide's record in a stage (adds the package versions) and save."""
        rec = dict(fields)
        rec.setdefault("versions", package_versions())
        self.stage(stage)["slides"][slide_id] = rec
        if save:
            self.save()
        return rec

    def stage_summary(self, stage: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.stage(stage)["slides"].values():
            counts[rec.get("status", "unknown")] = counts.get(rec.get("status", "unknown"), 0) + 1
        return counts

    def slide_dir(self, slide_id: str) -> Path:
        return self.path / "slides" / slide_id
