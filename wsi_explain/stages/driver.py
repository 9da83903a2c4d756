"""The per-slide stage skeleton, written once (tiling and extraction use it).

A per-slide stage: decides per slide whether it is already done (its own skip rule), sends the
rest to an executor (here, or Dask workers) as tasks that never raise for a bad slide
(:func:`guarded`), and records each outcome in the manifest as it arrives (:func:`collect`): done,
or failed with its message, the batch going on. A full disk stops the stage with
:class:`DiskFullError` (every other slide would fail the same way); what finished stays recorded,
so a rerun resumes.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable

from wsi_explain.core.errors import DiskFullError, SlideError, WsiExplainError, is_disk_full
from wsi_explain.core.run import RunFolder, now_iso

__all__ = ["guarded", "collect", "record_failure"]

logger = logging.getLogger(__name__)


def guarded(verb: str, label: str, work: Callable[[], dict]) -> dict:
    """Run one slide's ``work`` (a task's body) and report instead of raising.

    Parameters
    ----------
    verb : "tiling", "extracting"... (in messages).
    label : the slide as messages name it (its path, or "slide <id>").
    work : returns a dict of outcome fields (``result``...).

    Returns
    -------
    dict: ``{"ok": True, "start", "end", **work()}``; or ``{"ok": False, "error", "start",
    "seconds"}`` for a bad slide (a slide error's own message; an unexpected error is logged with
    its traceback); or ``{"ok": False, "disk_full": True, "error"}`` when the disk is full.
    """
    start, t0 = now_iso(), time.perf_counter()
    try:
        fields = work()
        return {"ok": True, "start": start, "end": now_iso(), **fields}
    except (SlideError, WsiExplainError, OSError) as exc:
        if is_disk_full(exc):
            return {"ok": False, "disk_full": True, "error": f"disk full while {verb} {label}: {exc}"}
        msg = str(exc) if isinstance(exc, (SlideError, WsiExplainError)) else f"{label}: {type(exc).__name__}: {exc}"
    except Exception as exc:  # an unexpected bug must not sink the batch; keep the traceback
        if is_disk_full(exc):
            return {"ok": False, "disk_full": True, "error": f"disk full while {verb} {label}: {exc}"}
        logger.error("%s: unexpected error while %s\n%s", label, verb, traceback.format_exc())
        msg = f"{label}: unexpected {type(exc).__name__}: {exc}"
    return {"ok": False, "error": msg, "start": start, "seconds": time.perf_counter() - t0}


def collect(
    outcomes: Iterable[tuple[object, dict]],
    *,
    done: Callable[[object, dict], object],
    failed: Callable[[object, dict], object],
    on_slide: Callable[[object], None] | None,
    resume_hint: str,
) -> list[tuple[object, object]]:
    """Record each (item, outcome) of ``executor.map`` as it arrives.

    ``done(item, outcome)`` / ``failed(item, outcome)`` record it in the manifest and return the
    stage's result object; ``on_slide`` gets each result. Returns [(item, result)] in arrival
    order. Raises :class:`DiskFullError` (message + ``resume_hint``) on a full disk.
    """
    results = []
    for item, out in outcomes:
        if out.get("disk_full"):
            raise DiskFullError(f"{out['error']}; {resume_hint}")
        res = done(item, out) if out["ok"] else failed(item, out)
        results.append((item, res))
        if on_slide is not None:
            on_slide(res)
    return results


def record_failure(
    run: RunFolder,
    stage: str,
    slide_id: str,
    *,
    params: str,
    fingerprint,
    start: str,
    seconds: float,
    error: str,
    **extra,
) -> None:
    """Record a failed slide in the manifest (no outputs, the message) and log it."""
    logger.warning("%s stage failed: %s", stage, error)
    run.record(
        stage,
        slide_id,
        status="failed",
        params=params,
        fingerprint=fingerprint,
        outputs=[],
        start=start,
        end=now_iso(),
        seconds=round(seconds, 3),
        error=error,
        **extra,
    )
