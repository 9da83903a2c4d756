"""Process-level performance settings for CPU inference."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time

__all__ = ["tune_malloc", "set_threads", "PartClock"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(mmap_threshold: int = 1 << 25, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds, as ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` would, so large activation tensors reuse heap memory instead of
    being mapped and page-faulted again for every batch (much system time on small CPUs).

    Returns True when applied (glibc only); does nothing when the environment variables are set.
    """
    global _done
    if _done or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
        )
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    logger.debug("glibc malloc thresholds raised: %s", ok)
    return _done


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: all cores) and return the number used."""
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


class PartClock:
    """Seconds spent per named part, summed over calls (``with clock("part"):``), and the time spent
    waiting for each item of an iterator (``clock.iterate("read", it)``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, secs: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + secs, 4)

    def __call__(self, name: str):
        @contextlib.contextmanager
        def part():
            t = time.perf_counter()
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - t)

        return part()

    def iterate(self, name: str, items):
        it = iter(items)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.add(name, time.perf_counter() - t)
            yield item
