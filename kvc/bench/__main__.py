"""`make bench` (`python -m kvc.bench`): how fast kvc runs SmolLM2-135M here, and how close Q8_0 stays to f32.

The command line: options to a Plan, then results.json, bench.png and the markdown tables. With the
hidden --one / --one-llama it is instead the child that measures one configuration (see child.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .files import BENCH_DIR, DEFAULT_MODELS, require_model
from .kvc_run import run_one
from .llama import gguf_dtype, run_one_llama
from .plot import plot
from .suite import Plan, run_bench
from .tables import markdown_tables
from .workload import FULL, QUICK, Sizes


def parser() -> argparse.ArgumentParser:
    """The bench's options (`python -m kvc.bench --help`)."""
    ap = argparse.ArgumentParser(prog="python -m kvc.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="f32,q8_0", help="weight types to run (default f32,q8_0)")
    for dtype, (path, target) in DEFAULT_MODELS.items():
        ap.add_argument(f"--{dtype}", metavar="MODEL", default=str(path),
                        help=f"kvc {dtype} model (default {path.parent.name}/{path.name}, from `{target}`)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check")
    ap.add_argument("--out", default=str(BENCH_DIR), help="folder for results.json and bench.png")
    ap.add_argument("--gguf", help="SmolLM2 GGUF for llama.cpp (default: found like `make data` puts it)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if llama-cpp-python is installed")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each configuration wait up to S seconds for the CPU to be under 10%% busy")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per configuration")
    ap.add_argument("--prefill", help="prompt lengths, e.g. 128,512")
    ap.add_argument("--decode", type=int, help="tokens to decode")
    ap.add_argument("--positions", help="cache positions for ms/token, e.g. 0,256,512,1024,2048")
    ap.add_argument("--steps", type=int, help="decode steps timed per position")
    ap.add_argument("--repeats", type=int, help="prefill repeats (best kept)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--one-llama", nargs=2, metavar=("GGUF", "THREADS"), help=argparse.SUPPRESS)
    return ap


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def sizes_from_args(a: argparse.Namespace) -> Sizes:
    """QUICK or FULL sizes, with the options that override them."""
    s = Sizes(**asdict(QUICK if a.quick else FULL))
    if a.prefill:
        s.prefill = _ints(a.prefill)
    if a.decode is not None:
        s.decode = a.decode
    if a.positions:
        s.positions = _ints(a.positions)
    if a.steps is not None:
        s.steps = a.steps
    if a.repeats is not None:
        s.repeats = a.repeats
    return s


def _child(a: argparse.Namespace, sizes: Sizes) -> int:
    """One configuration in this process, printed as one JSON line for the parent (child.py)."""
    if a.one:
        path, threads = a.one
        res = run_one(path, int(threads), sizes)
    else:
        path, threads = a.one_llama
        res = run_one_llama(path, int(threads), sizes)
        res["dtype"] = gguf_dtype(path)
    print(json.dumps(res), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the bench (or, with --one / --one-llama, one configuration); 1 if a configuration failed."""
    ap = parser()
    a = ap.parse_args(argv)
    sizes = sizes_from_args(a)
    if a.one or a.one_llama:
        return _child(a, sizes)

    dtypes = [d for d in a.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DEFAULT_MODELS:
            ap.error(f"unknown dtype {d!r} (choose from {', '.join(DEFAULT_MODELS)})")
    models = {d: require_model(d, getattr(a, d)).resolve() for d in dtypes}
    plan = Plan(models=models, threads=_ints(a.threads), sizes=sizes, mode="quick" if a.quick else "full",
                gguf=Path(a.gguf) if a.gguf else None, llama=not a.no_llama, wait_idle=a.wait_idle,
                timeout=a.timeout)
    results = run_bench(plan)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    why = plot(results, out / "bench.png")
    print(markdown_tables(results))
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'bench.png'}" if why is None else f" (no plot: {why})"),
          file=sys.stderr)
    return 1 if any("error" in r for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
