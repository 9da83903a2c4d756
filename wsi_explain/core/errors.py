"""Exceptions of the application (the stage packages have their own, re-exported here)."""

from __future__ import annotations

from tiling.errors import (  # noqa: F401  (re-exported)
    AnnotationError,
    GridError,
    MissingMppError,
    NoTissueError,
    SlideError,
    SlideNotFoundError,
    SlideOpenError,
    TileReadError,
)

__all__ = [
    "WsiExplainError",
    "RunLockedError",
    "ManifestError",
    "SlideListError",
    "DiskFullError",
    "is_disk_full",
    "AnnotationError",
    "GridError",
    "MissingMppError",
    "NoTissueError",
    "SlideError",
    "SlideNotFoundError",
    "SlideOpenError",
    "TileReadError",
]


class WsiExplainError(Exception):
    """Base class of application errors that are not about one slide."""


class RunLockedError(WsiExplainError):
    """Another process holds the run folder open for writing."""


class ManifestError(WsiExplainError):
    """The run folder's manifest.json is unreadable or of an unknown schema."""


class SlideListError(WsiExplainError):
    """The list of slides (arguments, folder or CSV) is unusable."""


class DiskFullError(WsiExplainError):
    """No space left where the run folder is written: the run stops (other slides would fail
    the same way); what finished stays recorded, and a rerun after freeing space resumes."""


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT anywhere in an exception's chain."""
    import errno

    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
