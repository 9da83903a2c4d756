"""Exceptions raised by the tiling package.

Every message names the slide (file path) and says how to fix the problem.
"""

from __future__ import annotations

__all__ = [
    "SlideError",
    "SlideNotFoundError",
    "SlideOpenError",
    "MissingMppError",
    "NoTissueError",
    "TileReadError",
    "AnnotationError",
    "GridError",
]


class SlideError(ValueError):
    """Base class of every per-slide problem; carries the offending path."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist."""


class SlideOpenError(SlideError):
    """The file exists but cannot be opened as a slide."""


class MissingMppError(SlideError):
    """The slide does not state its resolution (µm per pixel)."""


class NoTissueError(SlideError):
    """Tissue detection found nothing to tile."""


class TileReadError(SlideError):
    """A region of the slide failed to decode."""


class AnnotationError(SlideError):
    """An annotation file (GeoJSON or label mask) is unreadable or inconsistent."""


class GridError(SlideError):
    """The grid parameters do not fit this slide (e.g. the slide is smaller than one tile)."""
