"""`python -m kvc.serve MODEL`: an OpenAI-compatible HTTP server for a kvc model (uvicorn)."""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys

DESCRIPTION = """\
An OpenAI-compatible server for a kvc model: POST /v1/chat/completions and /v1/completions (plain
and streamed), GET /v1/models, /health and /metrics (Prometheus); with --slot-save-path DIR also
POST /slots/save and /slots/restore (a conversation's KV cache to DIR/filename and back).

Every request runs on one paged KV cache (--kv-blocks blocks of --block-size positions, or
--kv-memory bytes of them) with continuous batching: each step is one forward pass over the next
token of every running sequence plus chunks of new prompts (at most --max-step-tokens tokens), so
requests join and leave between tokens. At most --parallel sequences run at once (a request with
n choices runs n, forked from its one prompt); the others wait in FIFO order, and when
--queue-size requests are already waiting new ones are refused with HTTP 503. Prompts that start
with blocks another request computed (a system prompt, a conversation's earlier turns) reuse them.
When the cache runs short, the most recently started sequence is set aside and recomputed later."""

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line and exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def fail(message: str) -> None:
    """Print one line to stderr and exit with status 1."""
    print(f"kvc.serve: error: {message}", file=sys.stderr)
    sys.exit(1)


def _at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return check


def parse_size(text: str) -> int:
    """Bytes from a size: a number with an optional unit, K/M/G/T or KiB/MiB/GiB/TiB (powers of 1024)
    or KB/MB/GB/TB (powers of 1000), case-insensitive: "512MiB", "2G", "1.5GB", "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512MiB, 2G, 1.5GB)")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than a byte")
    return size


def _port(text: str) -> int:
    value = _at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0..65535)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's arguments; a bad one prints one line and exits with status 1."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.sinks is not None and args.window is None:
        parser.error("--sinks needs --window")
    return args


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kvc.serve", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a kvc checkpoint (.bin) with a tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port to listen on; 0 picks a free one (default 8080)")
    p.add_argument("-np", "--parallel", type=_at_least(1), default=1, metavar="N",
                   help="most sequences running at once (a request with n choices takes n); the "
                        "others wait in the queue (default 1)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-blocks", type=_at_least(1), default=None, metavar="M",
                      help="KV cache size in blocks (default: enough for --parallel full contexts)")
    size.add_argument("--kv-memory", type=parse_size, default=None, metavar="SIZE",
                      help="KV cache size in bytes, e.g. 512MiB, 2G (the blocks that fit)")
    p.add_argument("--block-size", type=_at_least(1), default=16, metavar="N",
                   help="positions per KV block (default 16)")
    p.add_argument("--max-step-tokens", type=_at_least(1), default=256, metavar="N",
                   help="most tokens one batched step runs: decode tokens first, then prompt chunks "
                        "(default 256)")
    p.add_argument("-t", "--threads", type=_at_least(1), default=None, metavar="N",
                   help="threads running the batched steps (default: the pool's, all cores)")
    p.add_argument("-c", "--context", type=_at_least(2), default=None, metavar="N",
                   help="most positions per sequence (default: the model's)")
    p.add_argument("-ctk", "--cache-type-k", default="f32", metavar="T",
                   help="KV cache type of keys, as kvc.Model's cache_type_k (f32, f16, bf16, q8_0, q4_0, ...; "
                        "default f32)")
    p.add_argument("-ctv", "--cache-type-v", default="f32", metavar="T",
                   help="KV cache type of values, as kvc.Model's cache_type_v (f32, f16, bf16, q8_0, q4_0, ...; "
                        "default f32)")
    p.add_argument("--window", type=_at_least(1), default=None, metavar="N",
                   help="every sequence keeps only its last N positions (a multiple of --block-size) and its "
                        "--sinks first, and a request with max_tokens runs on past the context (default: no window)")
    p.add_argument("--sinks", type=_at_least(0), default=None, metavar="S",
                   help="with --window: the first positions kept (attention sinks; default 4)")
    p.add_argument("--queue-size", type=_at_least(0), default=64, metavar="N",
                   help="requests that may wait to start; more get HTTP 503 (default 64)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in /v1/models and responses (default: the file's name)")
    p.add_argument("--slot-save-path", default=None, metavar="DIR",
                   help="folder of the session files POST /slots/save writes and /slots/restore reads "
                        "(made if missing; default: none, and those routes answer 501)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    return p


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.path.isfile(args.model):
        fail(f"no model file at {args.model}")
    if args.slot_save_path is not None:
        try:
            os.makedirs(args.slot_save_path, exist_ok=True)
        except OSError as e:
            fail(f"cannot use --slot-save-path {args.slot_save_path}: {e}")
    try:
        sock = bind(args.host, args.port)
    except (OSError, OverflowError) as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e}")

    import uvicorn  # after the checks: the errors above come at once
    import uvicorn.logging

    from .app import create_app
    from .engine import BatchEngine

    try:
        engine = BatchEngine(args.model, parallel=args.parallel, kv_blocks=args.kv_blocks, kv_memory=args.kv_memory,
                             block_size=args.block_size, threads=args.threads, context=args.context,
                             cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                             max_step_tokens=args.max_step_tokens, queue_size=args.queue_size,
                             model_name=args.model_name, window=args.window, sinks=args.sinks)
    except (OSError, ValueError) as e:
        fail(f"cannot load {args.model}: {e}")
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"kvc.serve: {engine.model_name} at http://{url_host}:{port}/v1 (parallel {args.parallel}, KV cache "
          f"{engine.blocks_total} blocks of {engine.block_size}, context {engine.context_length}, "
          f"queue {args.queue_size}{', slots in ' + args.slot_save_path if args.slot_save_path else ''})",
          file=sys.stderr, flush=True)
    handler = logging.StreamHandler()  # kvc.serve's request lines, next to uvicorn's
    handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
    logger = logging.getLogger("kvc.serve")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    try:
        config = uvicorn.Config(create_app(engine, slot_save_path=args.slot_save_path), log_level=args.log_level,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


if __name__ == "__main__":
    main()
