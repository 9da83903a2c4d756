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
