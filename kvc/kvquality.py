"""python -m kvc.kvquality MODEL: how much quality each KV cache element type costs.

Teacher-forced over real text: the text is tokenized, cut into chunks of ctx tokens (the first token of
each replaced by BOS, as llama.cpp's llama-perplexity does), and each chunk goes through the model in
one forward() call: once with an f32 cache (the reference logits), then once per cache setup (K type,
V type, Hadamard rotation on or off). The engine prefills in blocks that attend over the cache, so the
cache type matters at every position. Per setup: perplexity (and its ratio to f32's), KL divergence
KL(f32 || setup) per position (mean, 99th percentile, max, in nats) and top-1 agreement with f32.

As llama.cpp's `llama-perplexity --kl-divergence`, only the second half of each chunk is scored (the
logits at positions ctx/2 .. ctx-2, each predicting the next token): the first half is context.

Memory stays bounded: one chunk's logits at a time, log-softmax in float64 over slices of rows, and
only per-position statistics kept across chunks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model import Model

DEFAULT_CHARS = 120_000  # of the pydoc topics text
DEFAULT_CTX = 2048
QUICK_CTX = 256  # --quick: one chunk of this many tokens
SLICE_ROWS = 64  # rows of logits per float64 log-softmax (64 x 49152 x 8 bytes = 25 MB)


@dataclass(frozen=True)
class CacheSetup:
    """One KV cache configuration: key type, value type, Hadamard rotation."""

    k: str
    v: str
    rotate: bool

    @property
    def label(self) -> str:
        """A short name, e.g. "q4_0/q8_0 rot"."""
        return f"{self.k}/{self.v}" + (" rot" if self.rotate else "")


REFERENCE = CacheSetup("f32", "f32", False)
SETUPS = [
    CacheSetup("f16", "f16", False),
    CacheSetup("bf16", "bf16", False),
    *(CacheSetup(k, v, rotate) for k, v in (("q8_0", "q8_0"), ("q4_0", "q8_0"), ("q4_0", "q4_0"))
      for rotate in (False, True)),
    CacheSetup("iq4_nl", "q8_0", True),
    CacheSetup("iq4_nl", "iq4_nl", True),
]


# ----------------------------------------------------------------------------------------------
# text and chunks


def default_text(chars: int | None = DEFAULT_CHARS) -> str:
    """The first `chars` characters (None: all, about 465,000) of Python's pydoc topics, sorted by name,
    joined by blank lines."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(v for _, v in sorted(topics.items()))[:chars]


def make_chunks(tokens: Sequence[int], ctx: int, n_chunks: int | None, bos: int) -> list[np.ndarray]:
    """Consecutive chunks of ctx tokens, each one's first token replaced by bos (llama.cpp's way).

    n_chunks None: as many as fit; more than fit raises ValueError.
    """
    fit = len(tokens) // ctx
    n = fit if n_chunks is None else n_chunks
    if n < 1 or n > fit:
        raise ValueError(f"the text is {len(tokens)} tokens: {fit} chunk(s) of {ctx} fit, asked for {n}")
    chunks = []
    for i in range(n):
        chunk = np.asarray(tokens[i * ctx:(i + 1) * ctx], dtype=np.int32)
        chunk[0] = bos
        chunks.append(chunk)
    return chunks


def scored_positions(ctx: int) -> slice:
    """The positions whose logits are scored: the second half of the chunk, ctx/2 .. ctx-2 (the last
    position has no next token)."""
    return slice(ctx // 2, ctx - 1)


# ----------------------------------------------------------------------------------------------
# statistics


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def position_stats(ref: np.ndarray, test: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position of two (T, vocab) logit arrays: kl = KL(ref || test) in nats, nll_ref / nll_test
    (negative log-likelihood of the target token) and top1 (whether the argmaxes agree).

    Works through SLICE_ROWS rows at a time so that only a slice is ever in float64.
    """
    if ref.shape != test.shape or ref.ndim != 2 or ref.shape[0] != len(targets):
        raise ValueError(f"need two (T, vocab) logit arrays and T targets, got {ref.shape}, {test.shape}, "
                         f"{len(targets)}")
    parts: dict[str, list[np.ndarray]] = {"kl": [], "nll_ref": [], "nll_test": [], "top1": []}
    for start in range(0, ref.shape[0], SLICE_ROWS):
        rows = slice(start, start + SLICE_ROWS)
        lp, lq = log_softmax(ref[rows]), log_softmax(test[rows])
        idx = np.arange(lp.shape[0])
        parts["kl"].append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        parts["nll_ref"].append(-lp[idx, targets[rows]])
        parts["nll_test"].append(-lq[idx, targets[rows]])
        parts["top1"].append(ref[rows].argmax(-1) == test[rows].argmax(-1))
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def summarize(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """One setup's numbers from its per-position statistics (all chunks concatenated)."""
    kl = stats["kl"]
    ppl, ppl_ref = np.exp(stats["nll_test"].mean()), np.exp(stats["nll_ref"].mean())
    return {
        "ppl": float(ppl),
        "ppl_ratio": float(ppl / ppl_ref),
        "mean_kl": float(kl.mean()),
        "mean_kl_se": float(kl.std(ddof=1) / np.sqrt(kl.size)) if kl.size > 1 else 0.0,
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "top1_agreement": float(stats["top1"].mean()),
    }


# ----------------------------------------------------------------------------------------------
# the run


def evaluate(path: str | Path, text: str, ctx: int, n_chunks: int | None = None, threads: int | None = None,
             setups: Sequence[CacheSetup] = SETUPS, log: Callable[[str], None] | None = None) -> dict:
    """Score every setup against the f32 cache on text; returns the run's parameters and one row per
    setup (the f32 reference first, compared with itself)."""
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(Model(path, seq_len=ctx, threads=threads))
        chunks = make_chunks(ref.encode(text, bos=False), ctx, n_chunks, ref.config.bos_id)
        models = {s: stack.enter_context(Model(path, seq_len=ctx, threads=threads, cache_type_k=s.k,
                                               cache_type_v=s.v, cache_rotate=s.rotate)) for s in setups}
        per_chunk: dict[CacheSetup, list[dict[str, np.ndarray]]] = {s: [] for s in [REFERENCE, *setups]}
        scored = scored_positions(ctx)
        started = time.perf_counter()
        for i, chunk in enumerate(chunks):
            targets = chunk[scored.start + 1:scored.stop + 1]
            ref.reset()
            ref_logits = ref.forward(chunk)[scored]
            per_chunk[REFERENCE].append(position_stats(ref_logits, ref_logits, targets))
            for setup, model in models.items():
                model.reset()
                per_chunk[setup].append(position_stats(ref_logits, model.forward(chunk)[scored], targets))
            if log:
                log(f"chunk {i + 1}/{len(chunks)} done, {time.perf_counter() - started:.0f} s")
    rows = []
    for setup, parts in per_chunk.items():
        stats = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        rows.append({"k": setup.k, "v": setup.v, "rotate": setup.rotate, **summarize(stats)})
    return {"model": str(path), "ctx": ctx, "chunks": len(chunks), "scored_per_chunk": scored.stop - scored.start,
            "threads": threads, "seconds": round(time.perf_counter() - started, 1), "rows": rows}


def format_table(result: dict) -> str:
    """The rows as a markdown table, with a line saying what was scored."""
    lines = [
        f"{result['chunks']} chunk(s) x {result['ctx']} tokens; scored: the second half of each chunk "
        f"({result['scored_per_chunk']} positions per chunk, llama.cpp's convention: the first half is context).",
        "",
        "| K/V cache | rotate | PPL | PPL / f32 | mean KL | p99 KL | max KL | top-1 agree |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['k']}/{r['v']} | {'yes' if r['rotate'] else 'no'} | {r['ppl']:.4f} | "
                     f"{r['ppl_ratio']:.5f} | {r['mean_kl']:.3g} | {r['p99_kl']:.3g} | {r['max_kl']:.3g} | "
                     f"{r['top1_agreement']:.4f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvc.kvquality", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a kvc .bin checkpoint")
    ap.add_argument("--text", type=Path, help="a UTF-8 text file (default: Python's pydoc topics)")
    ap.add_argument("--ctx", type=int, help=f"tokens per chunk (default {DEFAULT_CTX}; --quick: {QUICK_CTX})")
    ap.add_argument("--chunks", type=int, help="how many chunks (default: as many as fit; --quick: 1)")
    ap.add_argument("--threads", type=int, help="threads of the forward pass (default: every core)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--quick", action="store_true", help=f"one chunk of {QUICK_CTX} tokens (for tests)")
    args = ap.parse_args(argv)
    if args.ctx is None:
        args.ctx = QUICK_CTX if args.quick else DEFAULT_CTX
    if args.chunks is None and args.quick:
        args.chunks = 1
    if args.ctx < 4:
        ap.error("--ctx must be at least 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    try:
        result = evaluate(args.model, text, args.ctx, args.chunks, args.threads,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, IndexError) as e:
        print(f"kvquality: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
