"""The KV cache's element types (f32, f16, bf16, q8_0, q4_0): decode ms/token as the cache fills,
resident memory as it fills, and Model.memory(), for one (model, cache type) configuration.

A configuration's name is its type for K and V, with "+rot" for the default Hadamard rotation:
"q4_0" is stored plainly (cache_rotate=False), "q4_0+rot" as kvc rotates 4-bit caches by default.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..format import describe_types, read_types
from ..model import Model
from .kvc_run import measure_decode, text_tokens
from .rss import current_rss_mb, peak_rss_mb
from .timing import time_by_position
from .traffic import kv_bytes_read, weight_bytes_per_token
from .workload import FULL_CACHE, CacheSizes


def cache_options(name: str) -> dict:
    """kvc.Model's cache arguments for a configuration name: "q8_0" -> K and V q8_0, not rotated
    (for q4_0: rotation off); "q4_0+rot" -> the type's default rotation (on for q4_0)."""
    cache_type, _, rot = name.partition("+")
    if rot not in ("", "rot"):
        raise ValueError(f"cache configuration {name!r}: a type, optionally with +rot")
    return {"cache_type_k": cache_type, "cache_type_v": cache_type, "cache_rotate": None if rot else False}


def clamp_positions(positions: list[int], steps: int, context: int) -> list[tuple[int, int]]:
    """(asked, used) positions: a position whose `steps` tokens would pass the context's end moves
    back to context - steps (8192 on an 8192 context is measured at 8192 - steps); ones that would
    then collide with the previous position are dropped."""
    out: list[tuple[int, int]] = []
    for p in sorted(positions):
        used = min(p, context - steps)
        if used < 0 or (out and used < out[-1][1] + steps):
            continue
        out.append((p, used))
    return out


def measure_cache_by_position(model: Model, positions: list[tuple[int, int]], steps: int,
                              fill: list[int]) -> list[dict]:
    """ms per decoded token and resident memory with the cache filled to each position.

    positions: (asked, used) pairs, ascending. The cache is filled by prefill (untimed) from `fill`
    up to each used position, the process's RSS read there, then `steps` greedy decodes timed as in
    kvc_run.measure_decode_by_position. The cache must be fresh (never reset: reset writes every
    slot, so all its pages would be resident from the start); prefill from 0 overwrites whatever it holds.
    """
    rss: dict[int, float] = {}
    token = 0

    def prefill(start: int, end: int) -> None:
        model.prefill(fill[start:end], start)
        rss[end] = current_rss_mb()

    def step(pos: int, i: int) -> None:
        nonlocal token
        if i == 0 and pos not in rss:
            rss[pos] = current_rss_mb()
        token = int(np.argmax(model.prefill([fill[pos] if i == 0 else token], pos + i)))

    rows = time_by_position([used for _, used in positions], steps, prefill, step)
    for (asked, used), row in zip(positions, rows):
        row["asked"] = asked
        row["rss_mb"] = rss[used]
    return rows


def run_one_cache(path: str | os.PathLike, threads: int | None, cache: str, sizes: CacheSizes = FULL_CACHE) -> dict:
    """Every cache-type measurement of one (model, cache configuration), in this process (a child of
    the bench, so that its RSS is its own): Model.memory(), ms/token and RSS as the cache fills to
    each position, the process's peak RSS, and a short-context decode (prompt, then a few tokens)."""
    t_start = time.perf_counter()
    rss_start = current_rss_mb()
    model = Model(path, threads=threads, **cache_options(cache))
    cfg = model.config
    types = read_types(path)
    dtype = describe_types(cfg, types)
    positions = clamp_positions(sizes.positions, sizes.steps, cfg.seq_len)
    end = max([used for _, used in positions], default=0) + sizes.steps
    toks = text_tokens(model, max(end, sizes.short_prompt + sizes.short_decode, 16))
    rss_open = current_rss_mb()
    model.prefill(toks[:8], 0)  # warm-up: page the weights in (the cache's first rows too),
    for i in range(8):  # and a few single-token steps (overwritten by the measurement)
        model.prefill([toks[8 + i]], 8 + i)
    by_pos = measure_cache_by_position(model, positions, sizes.steps, toks)
    wbytes = weight_bytes_per_token(cfg, types)
    for row in by_pos:
        mid = row["pos"] + row["steps"] // 2
        kv = kv_bytes_read(cfg, mid, model.cache_type_k, model.cache_type_v)
        row["gb_s"] = (wbytes + kv) / (row["ms_per_token"] / 1e3) / 1e9
    short = measure_decode(model, toks[:sizes.short_prompt], sizes.short_decode)  # resets: after the RSS rows
    short["ms_per_token"] = 1e3 * short["seconds"] / short["tokens"]
    memory = model.memory()
    types = {"cache_type_k": model.cache_type_k, "cache_type_v": model.cache_type_v, "cache_rotate": model.cache_rotate}
    model.close()
    return {
        "engine": "kvc", "dtype": dtype, "cache": cache, **types, "threads": threads, "model": str(path),
        "context": cfg.seq_len, "memory": memory, "by_position": by_pos, "short_decode": short,
        "rss_before_open_mb": rss_start, "rss_after_open_mb": rss_open, "peak_rss_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - t_start,
    }


def _ms_at(record: dict, asked: int) -> float | None:
    """ms/token of a record at an asked position, or None."""
    for row in record["by_position"]:
        if row["asked"] == asked:
            return row["ms_per_token"]
    return None


def cache_summary(records: list[dict], at: int = 2048) -> list[dict]:
    """Per configuration: ms/token at `at` and at the last position over position 0 (the issue's
    target: q8_0 K+V with Q8_0 weights within 1.25 at 2048), and short-context decode against the
    same weights' f32 cache (target: at most 5% slower)."""
    ok = [r for r in records if "error" not in r]
    f32_short = {r["dtype"]: r["short_decode"]["ms_per_token"] for r in ok if r["cache"] == "f32"}
    out = []
    for r in ok:
        zero = _ms_at(r, 0)
        last = r["by_position"][-1] if r["by_position"] else None
        mid = _ms_at(r, at)
        short = r["short_decode"]["ms_per_token"]
        base = f32_short.get(r["dtype"])
        out.append({
            "dtype": r["dtype"], "cache": r["cache"],
            f"ratio_{at}": mid / zero if mid and zero else None,
            "last_asked": last["asked"] if last else None, "last_pos": last["pos"] if last else None,
            "ratio_last": last["ms_per_token"] / zero if last and zero else None,
            "short_ms": short, "short_vs_f32_pct": 100 * (short / base - 1) if base else None,
        })
    return out

