"""The machine the bench runs on: what it is (CPU, cores, memory, commit) and how busy it is."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time

import numpy as np

from .files import ROOT


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _git_revision() -> str:
    """The checkout's short commit, with +dirty when tracked files differ from it; "" without git."""
    rev = ""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev += "+dirty" if dirty and rev else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return rev


def machine_info() -> dict:
    """CPU model and flags, cores, memory, kernel, Python and numpy versions, date, kvc commit, load."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and val.strip():
                    cpu = val.strip()
                elif key == "flags" and not flags:
                    flags = val
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(),
        "avx512": " avx512f " in f" {flags} ", "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "kernel": platform.release(), "python": platform.python_version(), "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kvc_commit": _git_revision(), "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq and steal, i.e. everything but idle and iowait); None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold_pct: float = 10.0) -> float | None:
    """Wait (up to max_wait s) until the machine's CPU is under threshold_pct busy over a 1 s sample;
    returns the last sample's busy %, or None without /proc/stat."""
    cores = usable_cores()
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        b1 = cpu_busy_seconds()
        if b0 is None or b1 is None:
            return None
        pct = 100 * (b1 - b0) / ((time.monotonic() - t0) * cores)
        if pct < threshold_pct or time.monotonic() >= deadline:
            return pct
