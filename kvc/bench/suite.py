"""The whole bench: kvc beside llama.cpp, alternately on the same weights (part "side-by-side"); the
read-bandwidth roofline, every kvc configuration in a child process and Q8_0's quality against f32
(part "speed"); every KV cache type's decode latency and memory as the cache fills (part "cache");
the cost of generating without a cache (part "no-cache"); what each KV cache type costs in quality
(part "kv-quality", kvc.kvquality on the f32 model); bounded KV caches past the model's context:
perplexity by position for each policy and ms/token and RSS over a long windowed generation (part
"long-context", kvc.longppl and kvc.bench.window); what the paged cache and continuous batching buy
the server, beside llama-server (part "serving", kvc.bench.serving); one results dict (results.json)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bandwidth import measure_bandwidth
from .cache_types import cache_summary
from .child import run_cache_child, run_child
from .logit_quality import quality
from ..kvquality import DEFAULT_CTX, default_text, evaluate
from .. import longppl
from .machine import machine_info, wait_for_quiet
from .peer import peer_binary
from .serving import FULL_SERVING, ServingSizes, run_serving
from .side_by_side import FULL_SIDE, SideSizes, contenders, run_side_by_side
from .window import run_window
from .workload import BANDWIDTH_BYTES, CACHE_CONFIGS, FULL_CACHE, FULL_LONG, CacheSizes, LongSizes, Sizes

PARTS = ("side-by-side", "speed", "cache", "no-cache", "kv-quality", "long-context", "serving")
SERVING_DTYPES = ("q8_0", "f32")  # the serving part's models, those of the plan's weight types


@dataclass
class Plan:
    """What to run: the kvc model of each dtype, thread counts, sizes, and how."""

    models: dict[str, Path]  # dtype -> kvc model file
    threads: list[int]
    sizes: Sizes
    mode: str  # "full" or "quick" (names the sizes and the bandwidth array size)
    gguf: Path | None = None  # llama.cpp's GGUF, the shipped Q4_1 (None: find_gguf())
    wait_idle: float = 0  # seconds to wait for a quiet CPU before each configuration
    timeout: float = 1200  # seconds allowed per configuration
    parts: tuple[str, ...] = PARTS  # which of PARTS to run
    cache_sizes: CacheSizes = field(default_factory=lambda: FULL_CACHE)
    cache_configs: dict[str, list[str]] = field(default_factory=lambda: dict(CACHE_CONFIGS))  # dtype -> caches
    kv_quality_chunks: int = 8  # chunks the kv-quality part scores,
    kv_quality_ctx: int = DEFAULT_CTX  # of this many tokens
    side_sizes: SideSizes = field(default_factory=lambda: FULL_SIDE)  # the side-by-side part's
    long_sizes: LongSizes = field(default_factory=lambda: FULL_LONG)  # the long-context part's
    serving_sizes: ServingSizes = field(default_factory=lambda: FULL_SERVING)  # the serving part's


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _settle(plan: Plan) -> None:
    if plan.wait_idle:
        wait_for_quiet(plan.wait_idle)


def _speed_runs(plan: Plan, results: dict) -> None:
    """Roofline, every (dtype, threads) configuration and Q8_0's quality, into results."""
    for t in plan.threads:
        _settle(plan)
        bw = measure_bandwidth(t, BANDWIDTH_BYTES[plan.mode])
        results["roofline"][str(t)] = bw
        _say(f"read bandwidth, {t} thread(s): {bw['gb_s']:.1f} GB/s ({bw['kernel']})")
    for d, path in plan.models.items():
        for t in plan.threads:
            _settle(plan)
            _say(f"kvc {d}, {t} thread(s)...")
            res = run_child(path, t, plan.sizes, plan.timeout)
            res.setdefault("engine", "kvc")
            res.setdefault("dtype", d)
            res.setdefault("threads", t)
            results["runs"].append(res)
    if "f32" in plan.models and "q8_0" in plan.models:
        _say("q8_0 quality...")
        try:
            results["quality"] = quality(plan.models["f32"], plan.models["q8_0"])
        except Exception as e:  # report it with the rest rather than lose the timings
            results["quality"] = {"error": f"{type(e).__name__}: {e}"}


def _main_dtype(plan: Plan) -> str:
    """The weights of the parts that run one model: Q8_0's, else the first given."""
    return "q8_0" if "q8_0" in plan.models else next(iter(plan.models))


def _cache_runs(plan: Plan, results: dict) -> None:
    """The cache configurations of each model (results["cache_types"], with their summary) and the
    no-cache cost curve of the Q8_0 model, else the first (results["no_cache"]), each in a child."""
    threads = plan.cache_sizes.threads
    if "cache" in plan.parts:
        records = []
        for d, path in plan.models.items():
            for cache in plan.cache_configs.get(d, []):
                _settle(plan)
                _say(f"kvc {d} weights, {cache} cache, {threads} thread(s)...")
                res = run_cache_child(path, threads, cache, plan.cache_sizes, plan.timeout)
                res.setdefault("dtype", d)
                res.setdefault("cache", cache)
                res.setdefault("threads", threads)
                records.append(res)
        results["cache_types"] = records
        results["cache_summary"] = cache_summary(records)
    if "no-cache" in plan.parts and plan.models:
        d = _main_dtype(plan)
        _settle(plan)
        _say(f"kvc {d} weights with and without the cache, {threads} thread(s)...")
        res = run_cache_child(plan.models[d], threads, None, plan.cache_sizes, plan.timeout)
        res.setdefault("dtype", d)
        res.setdefault("threads", threads)
        results["no_cache"] = res


def _kv_quality(plan: Plan, results: dict) -> None:
    """Perplexity and KL divergence of every KV cache type against the f32 cache, on the f32 model
    (results["kv_quality"]; see kvc.kvquality). Skipped, with the reason, without an f32 model."""
    if "f32" not in plan.models:
        results["kv_quality"] = {"error": "skipped: the kv-quality part needs the f32 model (--dtypes f32,...)"}
        return
    _settle(plan)
    _say(f"KV cache quality: {plan.kv_quality_chunks} chunks of {plan.kv_quality_ctx} tokens...")
    try:
        results["kv_quality"] = evaluate(plan.models["f32"], default_text(), plan.kv_quality_ctx, plan.kv_quality_chunks,
                                         plan.cache_sizes.threads, log=_say)
    except (ValueError, IndexError) as e:  # report it with the rest rather than lose the timings
        results["kv_quality"] = {"error": f"{type(e).__name__}: {e}"}


def _long_context(plan: Plan, results: dict) -> None:
    """Perplexity by position per KV cache policy over text past the model's context (kvc.longppl), and
    ms/token and RSS over a long generation with a window (kvc.bench.window), on the Q8_0 model, else the
    first (results["long_context"]: "perplexity" and "generation", each with an "error" if it failed)."""
    d, s, threads = _main_dtype(plan), plan.long_sizes, plan.cache_sizes.threads
    _settle(plan)
    _say(f"long context: perplexity over {s.tokens} tokens, windows {s.windows}, {d} weights...")
    try:
        ppl = longppl.evaluate(plan.models[d], default_text(None), s.tokens, longppl.policies(s.windows),
                               threads=threads, log=_say)
    except (ValueError, IndexError) as e:  # report it with the rest rather than lose the timings
        ppl = {"error": f"{type(e).__name__}: {e}"}
    _settle(plan)
    _say(f"long context: {s.generate} tokens generated with a {s.window}-token window...")
    gen = run_window(plan.models[d], s.window, s.generate, s.every, threads, log=_say)
    results["long_context"] = {"dtype": d, "perplexity": ppl, "generation": gen}


def _serving(plan: Plan) -> dict:
    """The serving part on the Q8_0 and f32 models of the plan (else its first), on its most threads,
    with llama-server on their GGUFs where `make peer` built it (else kvc alone, with a note)."""
    models = {d: str(p) for d, p in plan.models.items() if d in SERVING_DTYPES} or \
        {d: str(p) for d, p in list(plan.models.items())[:1]}
    peers, server, notes = {}, None, []
    try:
        server = str(peer_binary("llama-server"))
        pairs, notes = contenders({d: Path(p) for d, p in models.items()}, plan.gguf)
        peers = {d: str(g) for d, (_, g) in pairs.items()}
    except (FileNotFoundError, RuntimeError) as e:
        notes.append(f"no llama-server: {e}")
    res = run_serving(models, plan.serving_sizes, max(plan.threads), peers, server, say=_say,
                      settle=lambda: _settle(plan))
    res["notes"] = notes
    return res


def run_bench(plan: Plan) -> dict:
    """Every measurement of the plan, with the machine's description: what results.json holds."""
    results = {"mode": plan.mode, "machine": machine_info(), "sizes": asdict(plan.sizes),
               "cache_sizes": asdict(plan.cache_sizes), "parts": list(plan.parts), "roofline": {}, "runs": []}
    t0 = time.perf_counter()
    load = results["machine"]["load_avg_before"][0]
    if load > 0.5:
        _say(f"warning: load average {load} — other work on this machine will skew the numbers")
    if "side-by-side" in plan.parts:
        _settle(plan)
        results["side_by_side"] = run_side_by_side(plan.models, plan.threads, plan.side_sizes, plan.gguf,
                                                   plan.timeout, _say)
    if "speed" in plan.parts:
        _speed_runs(plan, results)
    _cache_runs(plan, results)
    if "kv-quality" in plan.parts:
        _kv_quality(plan, results)
    if "long-context" in plan.parts and plan.models:
        _long_context(plan, results)
    if "serving" in plan.parts and plan.models:
        results["serving"] = _serving(plan)
    results["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = time.perf_counter() - t0
    return results

