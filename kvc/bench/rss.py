"""This process's resident memory (current and peak), MB of 2**20 bytes."""
from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS), MB of 2**20 bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB of 2**20 bytes."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def current_rss_mb() -> float:
    """This process's resident set now (VmRSS), MB of 2**20 bytes; NaN without /proc."""
    rss = _status_mb("VmRSS")
    return rss if rss is not None else float("nan")
