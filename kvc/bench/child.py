"""One configuration in a child process: `python -m kvc.bench --one MODEL THREADS` (or --one-side MODEL
THREADS PREFILL DECODE, --one-cache MODEL THREADS CACHE, --one-no-cache MODEL THREADS), which prints one JSON line. A fresh
process per configuration keeps each peak RSS its own (a process's peak only grows); thread counts
alone would not need it (each model has its own)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from .files import ROOT
from .machine import cpu_busy_seconds, usable_cores
from .workload import CacheSizes, Sizes


def size_args(sizes: Sizes) -> list[str]:
    """The command-line options that give a child these sizes."""
    return ["--prefill", ",".join(map(str, sizes.prefill)), "--decode", str(sizes.decode),
            "--positions", ",".join(map(str, sizes.positions)), "--steps", str(sizes.steps),
            "--repeats", str(sizes.repeats)]


def cache_size_args(sizes: CacheSizes) -> list[str]:
    """The command-line options that give a cache-type or no-cache child these sizes."""
    return ["--cache-positions", ",".join(map(str, sizes.positions)), "--cache-steps", str(sizes.steps),
            "--no-cache-n", ",".join(map(str, sizes.no_cache)), "--no-cache-prompt", str(sizes.no_cache_prompt),
            "--paired", ",".join(map(str, sizes.paired)), "--paired-steps", str(sizes.paired_steps)]


def run_child(path: str | os.PathLike, threads: int, sizes: Sizes, timeout: float) -> dict:
    """Measure one kvc configuration in a child process; its JSON record.

    A failure is a record with "error". Adds other_cpu_pct: the share of the machine's CPU time that
    something other than the child used while it ran (other processes, or the hypervisor's steal):
    its numbers are skewed when high.
    """
    return run_command(["--one", os.fspath(path), str(threads)] + size_args(sizes), timeout)


def run_cache_child(path: str | os.PathLike, threads: int, cache: str | None, sizes: CacheSizes,
                    timeout: float) -> dict:
    """One cache configuration (cache_types.run_one_cache) in a child process, or with cache None the
    no-cache cost curve (no_cache.run_one_no_cache); its JSON record, as run_child."""
    head = ["--one-no-cache", os.fspath(path), str(threads)] if cache is None else \
        ["--one-cache", os.fspath(path), str(threads), cache]
    return run_command(head + cache_size_args(sizes), timeout)


def run_command(args: list[str], timeout: float) -> dict:
    """`python -m kvc.bench ARGS` in a child process: the JSON record its last line holds (see run_child)."""
    cmd = [sys.executable, "-m", "kvc.bench"] + args
    # numpy's OpenBLAS threads would otherwise spin beside kvc's OpenMP threads in the child
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OPENBLAS_NUM_THREADS="1")
    busy0, ru0, t0 = cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall, busy1, ru1 = time.perf_counter() - t0, cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}
    res = json.loads(lines[-1])
    if busy0 is not None and busy1 is not None:
        own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        res["other_cpu_pct"] = max(0.0, 100 * (busy1 - busy0 - own) / (wall * usable_cores()))
    return res
