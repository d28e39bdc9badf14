"""`make bench` (`python -m kvc.bench`): how fast kvc runs SmolLM2-135M here, beside llama.cpp, and how close Q8_0 stays to f32.

The command line: options to a Plan, then results.json, bench.png, cache.png, long_context.png and the markdown tables.
With the hidden --one / --one-side / --one-cache / --one-no-cache it is instead the child that
measures one configuration (see child.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cache_types import run_one_cache
from .files import BENCH_DIR, DEFAULT_MODELS, require_model
from .kvc_run import run_one
from .no_cache import run_one_no_cache
from .plot import plot, plot_cache, plot_long_context, plot_side_by_side
from .serving import FULL_SERVING, QUICK_SERVING
from .side_by_side import FULL_SIDE, QUICK_SIDE, SideSizes, kvc_figures
from .suite import PARTS, Plan, run_bench
from .tables import markdown_tables
from .workload import (CACHE_CONFIGS, FULL, FULL_CACHE, FULL_LONG, QUICK, QUICK_CACHE, QUICK_LONG, CacheSizes, LongSizes,
                       Sizes, nonnegative_int, overridden, positions, positive_int, positive_ints)


def parser() -> argparse.ArgumentParser:
    """The bench's options (`python -m kvc.bench --help`)."""
    ap = argparse.ArgumentParser(prog="python -m kvc.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default=",".join(DEFAULT_MODELS),
                    help=f"weight types to run (default {','.join(DEFAULT_MODELS)})")
    for dtype, (path, target) in DEFAULT_MODELS.items():
        ap.add_argument(f"--{dtype}", metavar="MODEL", default=str(path),
                        help=f"kvc {dtype} model (default {path.parent.name}/{path.name}, from `{target}`)")
    ap.add_argument("--threads", type=positive_ints, default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check")
    ap.add_argument("--out", default=str(BENCH_DIR), help="folder for results.json and bench.png")
    ap.add_argument("--gguf", help="SmolLM2's Q4_1 GGUF, llama.cpp's weights (default: found like `make data` puts it)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each configuration wait up to S seconds for the CPU to be under 10%% busy")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per configuration")
    ap.add_argument("--prefill", type=positive_ints, help="prompt lengths, e.g. 128,512")
    ap.add_argument("--decode", type=positive_int, help="tokens to decode")
    ap.add_argument("--positions", type=positions, help="cache positions for ms/token, e.g. 0,256,512,1024,2048")
    ap.add_argument("--steps", type=positive_int, help="decode steps timed per position")
    ap.add_argument("--repeats", type=positive_int, help="prefill repeats (best kept)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"what to run (default {','.join(PARTS)}): speed: tok/s, ms/token and RSS per weight type and"
                         " thread count; cache: each KV cache type's ms/token, RSS and memory as the cache fills;"
                         " no-cache: generating with and without the cache; kv-quality: perplexity and KL divergence"
                         " of each KV cache type against the f32 cache (kvc.kvquality); side-by-side: kvc and"
                         " llama.cpp's llama-bench (`make peer`) alternately on the same weights; long-context:"
                         " perplexity by position past the model's context per bounded KV cache policy"
                         " (kvc.longppl) and ms/token and RSS over a long generation with a window (kvc.bench.window);"
                         " serving: KV memory of a request mix, prefix sharing, and 1..16 concurrent streams through"
                         " kvc.serve beside llama-server (kvc.bench.serving)")
    ap.add_argument("--cache-types", metavar="TYPES",
                    help="cache configurations for every weight type, e.g. f32,q8_0,q4_0+rot (default: "
                         + "; ".join(f"{d} weights {','.join(c)}" for d, c in CACHE_CONFIGS.items()) + ")")
    ap.add_argument("--cache-threads", type=positive_int, help="threads of the cache and no-cache parts (default 2)")
    ap.add_argument("--cache-positions", type=positions, help="cache positions of the cache part, e.g. 0,2048,8192 (one whose"
                                              " steps would pass the context's end is measured just before it)")
    ap.add_argument("--cache-steps", type=positive_int, help="decode steps timed per position in the cache part")
    ap.add_argument("--paired", type=positive_ints, metavar="P,...", help="positions the cache part times against position 0 by decoding"
                                                    " alternately, one model each (default 2048,8192)")
    ap.add_argument("--paired-steps", type=positive_int, help="rounds of that paired measurement (default 300)")
    ap.add_argument("--no-cache-n", type=positive_ints, metavar="N,...", help="tokens generated with and without the cache, e.g. 32,64,128")
    ap.add_argument("--no-cache-prompt", type=positive_int, help="prompt length before them")
    ap.add_argument("--kv-quality-chunks", type=positive_int, metavar="N",
                    help="chunks of 2048 tokens the kv-quality part scores (default 8; --quick: 1)")
    ap.add_argument("--side-rounds", type=positive_int, metavar="N", help="rounds of the side-by-side part (default 3)")
    ap.add_argument("--side-prefill", type=positive_ints, metavar="N,...", help="prompt lengths of the side-by-side part (default 128,512)")
    ap.add_argument("--side-decode", type=positive_int, metavar="N", help="tokens decoded in the side-by-side part (default 256)")
    ap.add_argument("--side-busy-decode", type=nonnegative_int, metavar="N",
                    help="tokens decoded with one core busy in the side-by-side part (default 64; 0: skip)")
    ap.add_argument("--long-tokens", type=positive_int, metavar="N",
                    help=f"tokens the long-context part scores (default {FULL_LONG.tokens:,}; --quick:"
                         f" {QUICK_LONG.tokens:,})")
    ap.add_argument("--long-generate", type=positive_int, metavar="N",
                    help=f"tokens of the long-context part's generation (default {FULL_LONG.generate:,}; --quick:"
                         f" {QUICK_LONG.generate:,})")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--one-side", nargs=4, metavar=("MODEL", "THREADS", "PREFILL", "DECODE"), help=argparse.SUPPRESS)
    ap.add_argument("--one-cache", nargs=3, metavar=("MODEL", "THREADS", "CACHE"), help=argparse.SUPPRESS)
    ap.add_argument("--one-no-cache", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    return ap


def sizes_from_args(a: argparse.Namespace) -> Sizes:
    """QUICK or FULL sizes, with the options that override them."""
    return overridden(QUICK if a.quick else FULL, prefill=a.prefill, decode=a.decode,
                      positions=a.positions, steps=a.steps, repeats=a.repeats)


def cache_sizes_from_args(a: argparse.Namespace) -> CacheSizes:
    """QUICK_CACHE or FULL_CACHE sizes, with the options that override them."""
    return overridden(QUICK_CACHE if a.quick else FULL_CACHE, positions=a.cache_positions, steps=a.cache_steps,
                      no_cache=a.no_cache_n, no_cache_prompt=a.no_cache_prompt, threads=a.cache_threads,
                      paired=a.paired, paired_steps=a.paired_steps)


def side_sizes_from_args(a: argparse.Namespace) -> SideSizes:
    """QUICK_SIDE or FULL_SIDE sizes, with the options that override them."""
    return overridden(QUICK_SIDE if a.quick else FULL_SIDE, rounds=a.side_rounds, prefill=a.side_prefill,
                      decode=a.side_decode, busy_decode=a.side_busy_decode)


def long_sizes_from_args(a: argparse.Namespace) -> LongSizes:
    """QUICK_LONG or FULL_LONG sizes, with the options that override them."""
    return overridden(QUICK_LONG if a.quick else FULL_LONG, tokens=a.long_tokens, generate=a.long_generate)


def _child(a: argparse.Namespace, sizes: Sizes, cache_sizes: CacheSizes) -> int:
    """One configuration in this process, printed as one JSON line for the parent (child.py)."""
    if a.one:
        path, threads = a.one
        res = run_one(path, int(threads), sizes)
    elif a.one_cache:
        path, threads, cache = a.one_cache
        res = run_one_cache(path, int(threads), cache, cache_sizes)
    elif a.one_no_cache:
        path, threads = a.one_no_cache
        res = run_one_no_cache(path, int(threads), cache_sizes)
    else:
        path, threads, prefill, decode = a.one_side
        res = kvc_figures(path, int(threads), [int(x) for x in prefill.split(",") if x], int(decode))  # may be none
    print(json.dumps(res), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the bench (or, with --one / --one-side / --one-cache / --one-no-cache, one configuration); 1 if a
    configuration failed."""
    ap = parser()
    a = ap.parse_args(argv)
    sizes, cache_sizes = sizes_from_args(a), cache_sizes_from_args(a)
    if a.one or a.one_side or a.one_cache or a.one_no_cache:
        return _child(a, sizes, cache_sizes)
    parts = tuple(p for p in a.parts.split(",") if p)
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r} (choose from {', '.join(PARTS)})")

    dtypes = [d for d in a.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DEFAULT_MODELS:
            ap.error(f"unknown dtype {d!r} (choose from {', '.join(DEFAULT_MODELS)})")
    models = {d: require_model(d, getattr(a, d)).resolve() for d in dtypes}
    configs = {d: CACHE_CONFIGS.get(d, []) if a.cache_types is None else [c for c in a.cache_types.split(",") if c]
               for d in dtypes}
    plan = Plan(models=models, threads=a.threads, sizes=sizes, mode="quick" if a.quick else "full",
                gguf=Path(a.gguf) if a.gguf else None, wait_idle=a.wait_idle,
                timeout=a.timeout, parts=parts, cache_sizes=cache_sizes, cache_configs=configs,
                kv_quality_chunks=a.kv_quality_chunks or (1 if a.quick else 8), side_sizes=side_sizes_from_args(a),
                long_sizes=long_sizes_from_args(a),
                serving_sizes=QUICK_SERVING if a.quick else FULL_SERVING)
    results = run_bench(plan)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    pngs = []
    if results.get("side_by_side", {}).get("rows"):
        pngs.append(("side_by_side.png", plot_side_by_side(results, out / "side_by_side.png")))
    if results["runs"]:
        pngs.append(("bench.png", plot(results, out / "bench.png")))
    if "cache_types" in results or "no_cache" in results:
        pngs.append(("cache.png", plot_cache(results, out / "cache.png")))
    long_context = results.get("long_context", {})
    if long_context:
        pngs.append(("long_context.png", plot_long_context(long_context["perplexity"], out / "long_context.png",
                                                           long_context["generation"])))
    print(markdown_tables(results))
    wrote = [str(out / name) for name, why in pngs if why is None]
    why_not = [f"no {name}: {why}" for name, why in pngs if why is not None]
    print(f"\nwrote {', '.join([str(out / 'results.json')] + wrote)}" + "".join(f" ({w})" for w in why_not),
          file=sys.stderr)
    records = results["runs"] + results.get("cache_types", []) + [results.get("no_cache", {}), results.get("kv_quality", {}),
                                                                  long_context.get("perplexity", {}),
                                                                  long_context.get("generation", {})]
    side = results.get("side_by_side", {})
    failed = (any("error" in r for r in records) or bool(side.get("errors"))
              or bool(results.get("serving", {}).get("throughput", {}).get("errors")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
