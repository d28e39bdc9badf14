"""python -m kvc.longppl MODEL: perplexity over a text longer than the context, with bounded KV caches.

Teacher-forced over real text (default: all of Python's pydoc topics, about 113,000 SmolLM2 tokens, cut
to --tokens): the tokens, BOS first, go through the model --chunk at a time, each chunk at the position
after the last (model.forward(chunk, pos)), and each logit row scores the next token (log-softmax in
float64). The KV cache policies compared:

- dense: the whole cache. Only the first config.seq_len tokens (the model's context) fit, so it scores
  only those.
- window: the most recent N positions and nothing else (sinks=0): BOS leaves the cache at the first
  eviction.
- window+sinks: the most recent N positions and the first S (StreamingLLM's attention sinks, default 4).
  The engine's window moves a block (16 positions) at a time: once full a token sees N-15..N of them.
- h2o: a budget of N positions: the R most recent and those with the most accumulated attention (H2O);
  its keys keep RoPE at their own positions, so like dense it scores only the first config.seq_len tokens.

Per policy: perplexity over every scored token, over the first config.seq_len (dense's span, to set
beside it), over those after the first eviction (logit rows at positions >= N + S: the cache would
need more than it keeps) and over those past the model's context; and perplexity per bucket of
positions, the curve of long_context.png. A policy the engine does not offer (kvc.Model refuses its
keyword arguments) is reported as not available.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kvquality import default_text, log_softmax
from .model import Model
from .pool import DEFAULT_SINKS

DEFAULT_TOKENS = 16_384
DEFAULT_WINDOWS = (256, 512, 1024)
DEFAULT_CHUNK = 64  # tokens per forward() call: 64 rows of logits, 25 MB in float64 for a 49,152 vocab
DEFAULT_BUCKET = 256  # positions per point of the perplexity curve
BLOCK = 16  # a window is a whole number of the cache's blocks


@dataclass(frozen=True)
class Policy:
    """One KV cache policy: its name, the kvc.Model keyword arguments that ask for it, and how many
    positions it keeps (window, of them sinks pinned at the start; window None: all, the dense cache)."""

    name: str
    kwargs: tuple[tuple[str, int], ...] = ()
    window: int | None = None
    sinks: int = 0

    @property
    def capacity(self) -> int | None:
        """Positions the cache holds before its first eviction (None: it never evicts)."""
        return None if self.window is None else self.window + self.sinks

    @property
    def label(self) -> str:
        """A short name, e.g. "window 256 + 4 sinks", "h2o 256 (128 recent)"."""
        kw = dict(self.kwargs)
        if self.name == "h2o":
            return f"h2o {kw['h2o']} ({kw['recent']} recent)"
        if self.window is None:
            return self.name
        return f"window {self.window}" + (f" + {self.sinks} sinks" if self.sinks else "")


DENSE = Policy("dense")


def policies(windows: Sequence[int], sinks: int = DEFAULT_SINKS, h2o_recent: int | None = None) -> list[Policy]:
    """Dense, then for each window: window only, window + sinks (unless sinks is 0) and H2O with the same
    budget, of which h2o_recent recent (None: half the window; 0 leaves H2O out)."""
    out = [DENSE]
    for w in windows:
        out.append(Policy("window", (("window", w), ("sinks", 0)), w, 0))
        if sinks:
            out.append(Policy("window+sinks", (("window", w), ("sinks", sinks)), w, sinks))
        if h2o_recent != 0:
            out.append(Policy("h2o", (("h2o", w), ("recent", w // 2 if h2o_recent is None else h2o_recent)), w))
    return out


# ----------------------------------------------------------------------------------------------
# scoring


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) of each (vocab,) row of logits, in float64."""
    return -log_softmax(logits)[np.arange(len(targets)), targets]


def score(model: Model, tokens: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """nll[i] = -log p(tokens[i+1] | tokens[:i+1]) for every i: tokens fed from an empty cache, chunk at a
    time, at positions 0, chunk, 2 chunk, ... (the last token, which has nothing to predict, is not fed)."""
    n = len(tokens) - 1
    nll = np.empty(max(n, 0))
    model.reset()
    for pos in range(0, n, chunk):
        piece = tokens[pos:min(pos + chunk, n)]
        nll[pos:pos + len(piece)] = next_token_nll(model.forward(piece, pos), tokens[pos + 1:pos + 1 + len(piece)])
    return nll


def perplexity(nll: np.ndarray) -> float | None:
    """exp(mean nll), None when there is nothing to average."""
    return float(np.exp(nll.mean())) if nll.size else None


def bucket_perplexities(nll: np.ndarray, size: int) -> list[float]:
    """The perplexity of each run of `size` positions (the last one may be shorter)."""
    return [perplexity(nll[i:i + size]) for i in range(0, len(nll), size)]


def summarize(policy: Policy, nll: np.ndarray, context: int, bucket: int) -> dict:
    """One policy's row: what it is, how many positions it scored and its perplexities."""
    first_eviction = policy.capacity
    return {
        "policy": policy.name, "label": policy.label, "window": policy.window, "sinks": policy.sinks,
        "kwargs": dict(policy.kwargs), "first_eviction": first_eviction, "scored": int(nll.size),
        "ppl": perplexity(nll),
        "ppl_context": perplexity(nll[:context - 1]),
        "ppl_after_eviction": None if first_eviction is None else perplexity(nll[first_eviction:]),
        "ppl_past_context": perplexity(nll[context:]),
        "buckets": bucket_perplexities(nll, bucket),
    }


# ----------------------------------------------------------------------------------------------
# the run


def evaluate(path: str | Path, text: str, n_tokens: int = DEFAULT_TOKENS, run: Sequence[Policy] | None = None,
             chunk: int = DEFAULT_CHUNK, threads: int | None = None, bucket: int = DEFAULT_BUCKET,
             log: Callable[[str], None] | None = None) -> dict:
    """Score each policy (default: policies(DEFAULT_WINDOWS)) on the first n_tokens tokens of text, BOS
    first; returns the run's parameters and a row per policy. The dense policy scores only the first
    config.seq_len tokens; a policy whose Model keyword arguments are refused gets an "error" row."""
    from .bench.machine import machine_info

    run = policies(DEFAULT_WINDOWS) if run is None else run
    started = time.perf_counter()
    rows = []
    with Model(path, threads=threads) as dense:
        context = dense.config.seq_len
        tokens = np.asarray(dense.encode(text, bos=True)[:n_tokens], dtype=np.int32)
        if len(tokens) < n_tokens:
            raise ValueError(f"the text is {len(tokens)} tokens (BOS included), asked for {n_tokens}")
        for policy in run:
            t0 = time.perf_counter()
            if policy.capacity is None:
                row = summarize(policy, score(dense, tokens[:context], chunk), context, bucket)
            else:
                row = _score_bounded(path, policy, tokens, chunk, threads, context, bucket)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            if log:
                log(f"{policy.label}: {row['error'] if 'error' in row else 'PPL ' + _cell(row['ppl'])}"
                    f" ({row['seconds']} s)")
    return {"model": str(path), "tokens": n_tokens, "context": context, "chunk": chunk, "bucket": bucket,
            "threads": threads, "machine": machine_info(), "seconds": round(time.perf_counter() - started, 1),
            "rows": rows}


def _score_bounded(path: str | Path, policy: Policy, tokens: np.ndarray, chunk: int, threads: int | None,
                   context: int, bucket: int) -> dict:
    """A bounded policy's row, or its "error" row: "not available" when Model refuses its arguments."""
    try:
        model = Model(path, threads=threads, **dict(policy.kwargs))
    except (TypeError, ValueError) as e:
        return _error_row(policy, f"not available ({e})")
    with model:
        if policy.name == "h2o":  # H2O turns each key by its own position: it stops at the model's context
            tokens = tokens[:context]
        try:
            return summarize(policy, score(model, tokens, chunk), context, bucket)
        except (ValueError, IndexError) as e:  # report it beside the other rows rather than lose them
            return _error_row(policy, f"failed: {type(e).__name__}: {e}")


def _error_row(policy: Policy, error: str) -> dict:
    return {"policy": policy.name, "label": policy.label, "window": policy.window, "sinks": policy.sinks,
            "kwargs": dict(policy.kwargs), "error": error}


# ----------------------------------------------------------------------------------------------
# output


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(result: dict) -> str:
    """The rows as a markdown table, with a line saying what was scored."""
    ctx, n = result["context"], result["tokens"]
    dense = (f"so dense scores only the first {ctx} (PPL all = PPL first {ctx} for it)" if n > ctx
             else "so dense scores them all")
    lines = [
        f"{n} tokens, BOS first, fed {result['chunk']} at a time; the model's context is {ctx} tokens, {dense}. "
        "After first eviction: logit rows at positions >= window + sinks.",
        "",
        f"| policy | window | sinks | scored | PPL all | PPL first {ctx} | PPL after first eviction | PPL past {ctx} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        head = f"| {r['label']} | {r['window'] or '-'} | {r['kwargs'].get('sinks', '-')} |"  # sinks: Model's argument
        if "error" in r:
            lines.append(f"{head} {r['error'].split(' (')[0]} | | | | |")  # the reason is in the JSON
        else:
            lines.append(f"{head} {r['scored']} | {_cell(r['ppl'])} | {_cell(r['ppl_context'])} | "
                         f"{_cell(r['ppl_after_eviction'])} | {_cell(r['ppl_past_context'])} |")
    return "\n".join(lines)


def _window_list(text: str) -> list[int]:
    """--window's comma-separated sizes, each a positive multiple of BLOCK (ArgumentTypeError otherwise)."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or any(n <= 0 or n % BLOCK for n in sizes):
        raise argparse.ArgumentTypeError(f"windows must be positive multiples of {BLOCK}, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvc.longppl", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a kvc .bin checkpoint")
    ap.add_argument("--text", type=Path, help="a UTF-8 text file (default: Python's pydoc topics, all of them)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens scored (default {DEFAULT_TOKENS})")
    ap.add_argument("--window", type=_window_list, default=list(DEFAULT_WINDOWS), metavar="N[,N...]",
                    help=f"window sizes, multiples of {BLOCK} (default {','.join(map(str, DEFAULT_WINDOWS))})")
    ap.add_argument("--sinks", type=int, default=DEFAULT_SINKS,
                    help=f"attention sinks of the window+sinks rows (default {DEFAULT_SINKS}; 0: no such rows)")
    ap.add_argument("--h2o", type=int, metavar="R",
                    help="recent positions in each H2O budget (default: half the window; 0: no H2O rows)")
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help=f"tokens per forward() (default {DEFAULT_CHUNK})")
    ap.add_argument("--bucket", type=int, default=DEFAULT_BUCKET,
                    help=f"positions per point of the curve (default {DEFAULT_BUCKET})")
    ap.add_argument("--threads", type=int, help="threads of the forward pass (default: every core)")
    ap.add_argument("--out", type=Path, default=Path("longppl"), help="folder for longppl.json and longppl.png")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2")
    for name in ("chunk", "bucket", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.sinks < 0:
        ap.error("--sinks must be at least 0")
    if args.h2o is not None and not 0 <= args.h2o < min(args.window):
        ap.error(f"--h2o must lie in 0..{min(args.window) - 1} (below the smallest window)")
    return args


def main(argv: list[str] | None = None) -> int:
    from .bench.plot import plot_long_context

    args = parse_args(argv)
    text = args.text.read_text(encoding="utf-8") if args.text else default_text(None)
    try:
        result = evaluate(args.model, text, args.tokens, policies(args.window, args.sinks, args.h2o), args.chunk,
                          args.threads, args.bucket, log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, IndexError) as e:
        print(f"longppl: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "longppl.json").write_text(json.dumps(result, indent=2) + "\n")
    why_not = plot_long_context(result, args.out / "longppl.png")
    print(f"\nwrote {args.out / 'longppl.json'}" + (f" (no PNG: {why_not})" if why_not else
                                                    f", {args.out / 'longppl.png'}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
