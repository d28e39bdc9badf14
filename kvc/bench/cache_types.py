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
from .kvc_run import text_tokens
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


PAIRED_SPAN = 64  # each paired model decodes positions p .. p + PAIRED_SPAN - 1 over and over


def _quartile_ratio(num: np.ndarray, den: np.ndarray) -> dict:
    """The ratio of two (q1, median, q3) triples' medians, with the quartiles' ratios as its spread."""
    return {"ratio": float(num[1] / den[1]), "ratio_low": float(num[0] / den[2]), "ratio_high": float(num[2] / den[0])}


def measure_paired(path: str | os.PathLike, threads: int | None, cache: str, positions: list[int], steps: int,
                   fill: list[int], context: int) -> dict:
    """Decode ms/token at position 0 and at each of `positions`, and at position 0 with an f32 cache
    on the same weights, with the machine's drift cancelled: one Model per (cache, position) in this
    process, each filled to its position untimed, then `steps` rounds in which every model decodes
    one token in turn (at p + i mod PAIRED_SPAN, so its cache stays at p). Per position: the median
    step and its quartiles, and the ratio of medians to position 0's, with the quartiles' ratios as
    its spread (a slow stretch of the machine hits every model alike, so it moves the ratio less than
    timing one position after another would). The same against the f32 cache: short-context decode
    (positions 1..PAIRED_SPAN - 1) in this cache's type over the f32 cache's.

    positions: asked positions; one whose span passes `context` (the model's) is measured at
    context - span. fill: at least the last position + span tokens.
    Returns {"steps", "span", "rows": [{"asked", "pos", "ms", "ms_q1", "ms_q3", "ratio", "ratio_low",
    "ratio_high"}] (the first row position 0's, ratio 1), "vs_f32": {"ratio", "ratio_low", "ratio_high",
    "f32_ms"} or None for the f32 cache itself}."""
    span = min(PAIRED_SPAN, context)  # a model's context shorter than the span: all of it
    pairs = [(0, 0)]
    for asked in sorted(positions):
        used = min(asked, context - span)
        if used > pairs[-1][1]:
            pairs.append((asked, used))
    options = [cache_options(cache)] * len(pairs)
    if options[0] != cache_options("f32"):
        options.append(cache_options("f32"))
    used_at = [used for _, used in pairs] + [0] * (len(options) - len(pairs))
    models, times = [], []
    try:
        for used, opts in zip(used_at, options):
            m = Model(path, seq_len=used + span, threads=threads, **opts)
            models.append(m)
            m.prefill(fill[:max(used, 1)], 0)  # untimed; a model at position 0 holds its first token
            times.append([])
        for i in range(steps):
            for used, m, t in zip(used_at, models, times):
                pos = max(used, 1) + i % max(span - 1, 1)
                t0 = time.perf_counter()
                m.prefill([fill[pos]], pos)
                t.append(time.perf_counter() - t0)
    finally:
        for m in models:
            m.close()
    q = [np.percentile(t, [25, 50, 75]) * 1e3 for t in times]
    rows = [{"asked": asked, "pos": used, "ms": float(qi[1]), "ms_q1": float(qi[0]), "ms_q3": float(qi[2]),
             **_quartile_ratio(qi, q[0])} for (asked, used), qi in zip(pairs, q)]
    vs_f32 = {**_quartile_ratio(q[0], q[-1]), "f32_ms": float(q[-1][1])} if len(q) > len(pairs) else None
    return {"steps": steps, "span": span, "rows": rows, "vs_f32": vs_f32}


def run_one_cache(path: str | os.PathLike, threads: int | None, cache: str, sizes: CacheSizes = FULL_CACHE) -> dict:
    """Every cache-type measurement of one (model, cache configuration), in this process (a child of
    the bench, so that its RSS is its own): Model.memory(), ms/token and RSS as the cache fills to
    each position, the process's peak RSS, and the paired ratios of decode time at sizes.paired
    positions to position 0's and at position 0 to the f32 cache's (measure_paired)."""
    t_start = time.perf_counter()
    rss_start = current_rss_mb()
    model = Model(path, threads=threads, **cache_options(cache))
    cfg = model.config
    types = read_types(path)
    dtype = describe_types(cfg, types)
    positions = clamp_positions(sizes.positions, sizes.steps, cfg.seq_len)
    end = max([used for _, used in positions], default=0) + sizes.steps
    paired_end = min(max(sizes.paired, default=0) + PAIRED_SPAN, cfg.seq_len)
    toks = text_tokens(model, max(end, paired_end, 16))
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
    memory = model.memory()
    types = {"cache_type_k": model.cache_type_k, "cache_type_v": model.cache_type_v, "cache_rotate": model.cache_rotate}
    model.close()
    peak = peak_rss_mb()  # before the paired models, which hold caches of their own
    paired = measure_paired(path, threads, cache, sizes.paired, sizes.paired_steps, toks, cfg.seq_len)
    return {
        "engine": "kvc", "dtype": dtype, "cache": cache, **types, "threads": threads, "model": str(path),
        "context": cfg.seq_len, "memory": memory, "by_position": by_pos, "paired": paired,
        "rss_before_open_mb": rss_start, "rss_after_open_mb": rss_open, "peak_rss_mb": peak,
        "seconds": time.perf_counter() - t_start,
    }


def cache_summary(records: list[dict], at: int = 2048) -> list[dict]:
    """Per configuration, from its paired measurement: the ratio of decode time at `at` and at the
    last paired position to position 0's (the issue's target: q8_0 K+V with Q8_0 weights within 1.25
    at 2048), and short-context decode time over the same weights' f32 cache's (target: at most 1.05),
    each with its quartile spread."""
    out = []
    for r in records:
        if "error" in r:
            continue
        paired = r.get("paired", {})
        rows = paired.get("rows", [])
        mid = next((row for row in rows[1:] if row["asked"] == at), None)
        last = rows[-1] if len(rows) > 1 else None
        vs = paired.get("vs_f32")
        out.append({
            "dtype": r["dtype"], "cache": r["cache"],
            f"ratio_{at}": mid["ratio"] if mid else None,
            f"ratio_{at}_spread": [mid["ratio_low"], mid["ratio_high"]] if mid else None,
            "last_asked": last["asked"] if last else None, "last_pos": last["pos"] if last else None,
            "ratio_last": last["ratio"] if last else None,
            "ratio_last_spread": [last["ratio_low"], last["ratio_high"]] if last else None,
            "short_ms": rows[0]["ms"] if rows else None,
            "short_vs_f32": vs["ratio"] if vs else None,
            "short_vs_f32_spread": [vs["ratio_low"], vs["ratio_high"]] if vs else None,
        })
    return out
