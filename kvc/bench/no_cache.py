"""What the KV cache saves: generating n tokens with the cache (one new token per step) against
without it (every step recomputes the whole sequence from position 0, as Model.generate(use_cache=False)
and `./run --no-cache` do), the time per token against position both ways, and how total time grows
with n (log-log least squares: about 1 with the cache, 2 without)."""
from __future__ import annotations

import os
import time

import numpy as np

from ..format import describe_types, read_types
from ..model import Model
from .kvc_run import text_tokens
from .rss import peak_rss_mb
from .workload import FULL_CACHE, CacheSizes


def step_times(model: Model, prompt: list[int], n: int, use_cache: bool) -> tuple[list[float], list[int]]:
    """Seconds of each of n greedy decode steps after prompt (untimed), and the tokens they chose.

    With the cache step i runs one token at position len(prompt) + i; without it, step i runs the
    prompt and every token chosen so far from position 0 (the same work Model.generate(use_cache=False)
    does per token), so its cost grows with the sequence.
    """
    model.reset()
    seq = list(prompt)
    token = int(np.argmax(model.prefill(seq, 0)))
    times, chosen = [], []
    for _ in range(n):
        seq.append(token)
        chosen.append(token)
        t0 = time.perf_counter()
        logits = model.prefill([token], len(seq) - 1) if use_cache else model.prefill(seq, 0)
        times.append(time.perf_counter() - t0)
        token = int(np.argmax(logits))
    return times, chosen


def growth_exponent(ns: list[int], seconds: list[float]) -> float | None:
    """The slope of log(seconds) against log(n), least squares: k in seconds ~ c * n**k; None with
    fewer than two lengths."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(seconds), 1)[0])


def cost_curve(model: Model, prompt: list[int], lengths: list[int]) -> dict:
    """Total seconds to generate each of `lengths` tokens with and without the cache, per-step ms at
    each position both ways, and the fitted growth exponents.

    One run of max(lengths) steps each way: the time to generate n tokens is the sum of its first n
    steps (generating more tokens passes through every shorter length). "same_tokens": both ways chose
    the same greedy tokens; else "first_difference" is the first step where they did not (a near-tie
    that batched and single-token arithmetic round differently flips the rest).
    """
    n_max = max(lengths)
    cached, tokens_cached = step_times(model, prompt, n_max, use_cache=True)
    full, tokens_full = step_times(model, prompt, n_max, use_cache=False)
    cum_cached, cum_full = np.cumsum(cached), np.cumsum(full)
    ns = sorted(lengths)
    totals = [{"tokens": n, "cache_s": float(cum_cached[n - 1]), "no_cache_s": float(cum_full[n - 1]),
               "speedup": float(cum_full[n - 1] / cum_cached[n - 1])} for n in ns]
    return {
        "prompt": len(prompt), "lengths": ns, "totals": totals,
        "positions": [len(prompt) + i for i in range(n_max)],
        "cache_ms": [1e3 * t for t in cached], "no_cache_ms": [1e3 * t for t in full],
        "exponent_cache": growth_exponent(ns, [t["cache_s"] for t in totals]),
        "exponent_no_cache": growth_exponent(ns, [t["no_cache_s"] for t in totals]),
        "same_tokens": tokens_cached == tokens_full,
        "first_difference": next((i for i, (a, b) in enumerate(zip(tokens_cached, tokens_full)) if a != b), None),
    }


def run_one_no_cache(path: str | os.PathLike, threads: int | None, sizes: CacheSizes = FULL_CACHE) -> dict:
    """The cost curve of one model (default f32 cache), in this process."""
    t_start = time.perf_counter()
    model = Model(path, threads=threads, seq_len=sizes.no_cache_prompt + max(sizes.no_cache) + 1)
    dtype = describe_types(model.config, read_types(path))
    toks = text_tokens(model, sizes.no_cache_prompt)
    step_times(model, toks, 4, use_cache=True)  # warm-up: page the weights in, run a few single-token steps
    curve = cost_curve(model, toks, sizes.no_cache)
    model.close()
    return {"engine": "kvc", "dtype": dtype, "cache": "f32", "threads": threads, "model": str(path), **curve,
            "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t_start}
