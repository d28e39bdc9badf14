"""python -m kvc.bench.window MODEL: decode ms/token and RSS over a long generation with a sliding-window
KV cache (kvc.Model(path, window=N)), which should both stay flat once the window is full.

Greedy decoding, one token per forward() call, from a short prompt, for --tokens tokens (default
20,000, past the model's context): the time of each call (time.perf_counter) and, every --every
tokens, the process's RSS (/proc/self/status VmRSS). Per interval of --every tokens: the median and
mean ms/token and the RSS at its end. Greedy text from a small model soon repeats itself; that does
not change the cost of a step, which depends only on how many positions the cache holds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..model import Model
from .rss import current_rss_mb
from .workload import FIXED_TEXT

DEFAULT_WINDOW = 1024
DEFAULT_TOKENS = 20_000
DEFAULT_EVERY = 2_000
PROMPT_CHARS = 200  # of FIXED_TEXT: about 40 tokens


def run_window(path: str | Path, window: int = DEFAULT_WINDOW, tokens: int = DEFAULT_TOKENS,
               every: int = DEFAULT_EVERY, threads: int | None = None, sinks: int | None = None,
               log: Callable[[str], None] | None = None) -> dict:
    """Generate `tokens` tokens greedily with a window of `window` positions (and `sinks` sinks; None: the
    engine's default) and time each; returns the run's parameters and a mark per `every` tokens, or
    {"error": "not available (...)"} when kvc.Model refuses window=."""
    from .machine import machine_info

    kwargs = {"window": window} if sinks is None else {"window": window, "sinks": sinks}
    try:
        model = Model(path, threads=threads, **kwargs)
    except (TypeError, ValueError) as e:
        return {"model": str(path), "window": window, "error": f"not available ({e})"}
    with model:
        prompt = model.encode(FIXED_TEXT[:PROMPT_CHARS])
        logits = model.forward(prompt, 0)[-1]
        pos, times, marks = len(prompt), [], []
        started = time.perf_counter()
        for i in range(1, tokens + 1):
            token = int(np.argmax(logits))
            t0 = time.perf_counter()
            logits = model.forward([token], pos)[0]
            times.append(time.perf_counter() - t0)
            pos += 1
            if i % every == 0 or i == tokens:
                ms = 1000 * np.asarray(times)
                marks.append({"tokens": i, "position": pos, "ms_per_token": float(np.median(ms)),
                              "ms_mean": float(ms.mean()), "rss_mb": round(current_rss_mb(), 1)})
                times = []
                if log:
                    log(f"window {window}: {i} tokens, {marks[-1]['ms_per_token']:.2f} ms/token, "
                        f"RSS {marks[-1]['rss_mb']:.0f} MB")
    return {"model": str(path), "window": window, "sinks": sinks, "tokens": tokens, "every": every,
            "threads": threads, "prompt_tokens": len(prompt), "machine": machine_info(),
            "seconds": round(time.perf_counter() - started, 1), "marks": marks, **flatness(marks, window)}


def flatness(marks: list[dict], window: int) -> dict:
    """How much ms/token and RSS moved over the intervals that began with the window already full (the
    earlier ones attend over fewer positions): the largest median over the smallest, and the RSS
    growth in MB. None when no such interval ran."""
    full = [m for i, m in enumerate(marks) if i and marks[i - 1]["position"] >= window]
    if not full:
        return {"ms_ratio": None, "rss_growth_mb": None}
    ms = [m["ms_per_token"] for m in full]
    return {"ms_ratio": round(max(ms) / min(ms), 3), "rss_growth_mb": round(full[-1]["rss_mb"] - full[0]["rss_mb"], 1)}


def format_table(result: dict) -> str:
    """The marks as a markdown table, with a line saying what ran and how flat it stayed."""
    if "error" in result:
        return f"Long generation with a {result['window']}-token window: {result['error']}"
    ratio, growth = result["ms_ratio"], result["rss_growth_mb"]
    lines = [
        f"{result['tokens']} tokens generated greedily after a {result['prompt_tokens']}-token prompt with a "
        f"{result['window']}-token window, {result['threads'] or 'all'} thread(s); per {result['every']} tokens: "
        f"ms/token (median, mean) and RSS at the end. Once the window is full: slowest / fastest median "
        + ("-" if ratio is None else f"{ratio:.2f}")
        + ", RSS growth " + ("-" if growth is None else f"{growth:+.1f} MB") + ".",
        "",
        "| tokens | position | ms/token (median) | ms/token (mean) | RSS MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m in result["marks"]:
        lines.append(f"| {m['tokens']} | {m['position']} | {m['ms_per_token']:.2f} | {m['ms_mean']:.2f} | "
                     f"{m['rss_mb']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvc.bench.window", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a kvc .bin checkpoint")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"window (default {DEFAULT_WINDOW})")
    ap.add_argument("--sinks", type=int, help="attention sinks (default: the engine's)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to generate (default {DEFAULT_TOKENS})")
    ap.add_argument("--every", type=int, default=DEFAULT_EVERY, help=f"tokens per interval (default {DEFAULT_EVERY})")
    ap.add_argument("--threads", type=int, help="threads of the forward pass (default: every core)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    a = ap.parse_args(argv)
    for name in ("window", "tokens", "every", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    result = run_window(a.model, a.window, a.tokens, a.every, a.threads, a.sinks,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
