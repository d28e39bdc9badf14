"""Every measurement of one kvc configuration (model file, thread count), through kvc.Model's public API."""
from __future__ import annotations

import os
import time

import numpy as np

from ..format import describe_types, read_types
from ..model import Model
from .rss import current_rss_mb, peak_rss_mb
from .timing import best_time, decode_record, throughput, time_by_position
from .traffic import kv_bytes_read, weight_bytes_per_token
from .workload import FIXED_TEXT, FULL, Sizes, cycle_tokens


def text_tokens(model: Model, n: int) -> list[int]:
    """n tokens of FIXED_TEXT (cycled; BOS first), or a fixed pseudo-random sequence without a tokenizer."""
    if model.has_tokenizer:
        return cycle_tokens(model.encode(FIXED_TEXT, bos=True), model.encode(FIXED_TEXT, bos=False), n)
    rng = np.random.default_rng(0)
    return rng.integers(0, model.config.vocab_size, n).tolist()


def measure_prefill(model: Model, tokens: list[int], repeats: int = 2) -> dict:
    """Best-of-`repeats` time to run a prompt from an empty cache (last position's logits only)."""
    best = best_time(lambda: model.prefill(tokens, 0), repeats, before=model.reset)
    return throughput(len(tokens), best)


def measure_decode(model: Model, prompt: list[int], n: int) -> dict:
    """Greedy decode of n tokens after prompt (argmax, i.e. -t 0): one forward pass per token."""
    model.reset()
    pos, token = len(prompt), int(np.argmax(model.prefill(prompt, 0)))
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(model.prefill([token], pos)))
        pos += 1
    return decode_record(n, len(prompt), time.perf_counter() - t0)


def measure_decode_by_position(model: Model, positions: list[int], steps: int,
                               fill: list[int] | None = None) -> list[dict]:
    """ms per decoded token with the cache filled to each position (ascending), `steps` tokens each.

    The cache is filled by prefill (untimed) from `fill` (default: FIXED_TEXT tokens) up to each
    position; each timed step decodes greedily from fill[pos]. The median step time is reported.
    """
    fill = fill if fill is not None else text_tokens(model, max(positions) + steps)
    token = 0

    def prefill(start: int, end: int) -> None:
        model.prefill(fill[start:end], start)

    def step(pos: int, i: int) -> None:
        nonlocal token
        token = int(np.argmax(model.prefill([fill[pos] if i == 0 else token], pos + i)))

    model.reset()
    return time_by_position(positions, steps, prefill, step)


def run_one(path: str | os.PathLike, threads: int | None, sizes: Sizes = FULL) -> dict:
    """Every measurement of one (model, threads) configuration, in this process.

    threads None opens the model with the engine's default (OMP_NUM_THREADS, else every core). The
    count is the model's own (run.c's parallel regions take it from the model), so it affects no
    other model in the process.
    """
    rss_start = current_rss_mb()
    t_start = time.perf_counter()
    model = Model(path, seq_len=sizes.seq_len, threads=threads)
    cfg = model.config
    types = read_types(path)
    dtype = describe_types(cfg, types)
    wbytes = weight_bytes_per_token(cfg, types)
    toks = text_tokens(model, sizes.seq_len)
    measure_prefill(model, toks[:min(32, len(toks))], repeats=1)  # warm-up: page the weights in
    prefill = [measure_prefill(model, toks[:n], sizes.repeats) for n in sizes.prefill]
    decode = measure_decode(model, toks[:sizes.prompt], sizes.decode)
    kv = sum(kv_bytes_read(cfg, p) for p in range(decode["start_pos"], decode["start_pos"] + decode["tokens"]))
    decode["gb_s"] = (wbytes * decode["tokens"] + kv) / decode["seconds"] / 1e9
    by_pos = measure_decode_by_position(model, sizes.positions, sizes.steps, toks)
    for row in by_pos:
        mid = row["pos"] + row["steps"] // 2
        row["gb_s"] = (wbytes + kv_bytes_read(cfg, mid)) / (row["ms_per_token"] / 1e3) / 1e9
    model.close()
    return {
        "engine": "kvc", "dtype": dtype, "threads": threads, "model": str(path),
        "weight_bytes_per_token": wbytes, "seq_len": sizes.seq_len,
        "prefill": prefill, "decode": decode, "by_position": by_pos,
        "peak_rss_mb": peak_rss_mb(), "rss_before_open_mb": rss_start,
        "seconds": time.perf_counter() - t_start,
    }
