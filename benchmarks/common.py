"""Helpers shared by the benchmarks."""

from __future__ import annotations


def peak_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM; ru_maxrss would include the parent's at exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
