"""Engine-neutral timing: the loops kvc and llama.cpp are timed with, and the records they produce."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def throughput(tokens: int, seconds: float) -> dict:
    """A prefill record: tokens run, seconds taken, tokens per second."""
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def decode_record(tokens: int, start_pos: int, seconds: float) -> dict:
    """A decode record: tokens decoded one at a time from start_pos, seconds taken, tokens per second."""
    return {"tokens": tokens, "start_pos": start_pos, "seconds": seconds, "tok_s": tokens / seconds}


def best_time(run: Callable[[], None], repeats: int, before: Callable[[], None] = lambda: None) -> float:
    """The fastest of `repeats` (at least one) timed calls of run(), each after an untimed before()."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        before()
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def time_by_position(positions: list[int], steps: int, fill: Callable[[int, int], None],
                     step: Callable[[int, int], None]) -> list[dict]:
    """ms per decoded token with the cache filled to each position (ascending), `steps` tokens each.

    fill(start, end) runs positions start..end-1 untimed (the cache starts empty); step(p, i) runs
    one token at position p + i and is timed. The median step time is reported (robust to the odd
    slow step on a shared machine), the mean beside it.
    """
    cur, out = 0, []
    for p in sorted(positions):
        if p < cur:
            raise ValueError(f"positions must be at least {steps} apart")
        if p > cur:
            fill(cur, p)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(p, i)
            times.append(time.perf_counter() - t0)
        cur = p + steps
        out.append({"pos": p, "steps": steps, "ms_per_token": 1e3 * statistics.median(times),
                    "ms_mean": 1e3 * statistics.fmean(times)})
    return out
