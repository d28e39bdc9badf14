"""`python -m kvc.serve MODEL`: an OpenAI-compatible HTTP server for a kvc model (uvicorn)."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

DESCRIPTION = """\
An OpenAI-compatible server for a kvc model: POST /v1/chat/completions and /v1/completions (plain
and streamed), GET /v1/models, /health and /metrics (Prometheus).

Today each worker owns one kvc.Model, a single sequence that runs one request at a time: --parallel N
workers run N requests at once (sharing the memory-mapped weights), and requests beyond N wait in one
FIFO queue until a worker is free (as llama-server with -np N). When --queue-size requests are already
waiting, new ones are refused with HTTP 503. A chat's next turn that finds the worker holding its
conversation idle goes back to it, which then computes only the new tokens."""


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


def _port(text: str) -> int:
    value = _at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0..65535)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's arguments; a bad one prints one line and exits with status 1."""
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kvc.serve", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a kvc checkpoint (.bin) with a tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port to listen on; 0 picks a free one (default 8080)")
    p.add_argument("-np", "--parallel", type=_at_least(1), default=1, metavar="N",
                   help="workers, each with its own model and KV cache, running one request each; "
                        "requests beyond N wait in the queue (default 1)")
    p.add_argument("-t", "--threads", type=_at_least(1), default=None, metavar="N",
                   help="threads per worker (default: the cores divided among the workers)")
    p.add_argument("-c", "--context", type=_at_least(1), default=None, metavar="N",
                   help="context (KV cache positions) per worker (default: the model's)")
    p.add_argument("-ctk", "--cache-type-k", default="f32", metavar="T",
                   help="KV cache type of keys, as kvc.Model's cache_type_k (f32, f16, bf16, q8_0, q4_0, ...; "
                        "default f32)")
    p.add_argument("-ctv", "--cache-type-v", default="f32", metavar="T",
                   help="KV cache type of values, as kvc.Model's cache_type_v (f32, f16, bf16, q8_0, q4_0, ...; "
                        "default f32)")
    p.add_argument("--queue-size", type=_at_least(0), default=64, metavar="N",
                   help="requests that may wait for a worker; more get HTTP 503 (default 64)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in /v1/models and responses (default: the file's name)")
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
    try:
        sock = bind(args.host, args.port)
    except (OSError, OverflowError) as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e}")

    import uvicorn  # after the checks: the errors above come at once
    import uvicorn.logging

    from .app import create_app
    from .engine import WorkerEngine

    try:
        engine = WorkerEngine(args.model, parallel=args.parallel, threads=args.threads, context=args.context,
                              cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                              queue_size=args.queue_size, model_name=args.model_name)
    except (OSError, ValueError) as e:
        fail(f"cannot load {args.model}: {e}")
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"kvc.serve: {engine.model_name} at http://{url_host}:{port}/v1 ({args.parallel} worker(s) x "
          f"{engine.threads} thread(s), context {engine.context_length}, queue {args.queue_size})",
          file=sys.stderr, flush=True)
    handler = logging.StreamHandler()  # kvc.serve's request lines, next to uvicorn's
    handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
    logger = logging.getLogger("kvc.serve")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    try:
        config = uvicorn.Config(create_app(engine), log_level=args.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


if __name__ == "__main__":
    main()
