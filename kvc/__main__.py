"""python -m kvc chat MODEL | python -m kvc generate MODEL PROMPT — the Python face of ./run."""
from __future__ import annotations

import argparse
import sys

from .model import Model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvc", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("chat", "generate"):
        p = sub.add_parser(name)
        p.add_argument("model", help="a kvc .bin checkpoint")
        if name == "generate":
            p.add_argument("prompt")
        else:
            p.add_argument("--system", help="system prompt (default: the model's own)")
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int)
        p.add_argument("--context", type=int, help="context length (KV cache size)")
        p.add_argument("-ctk", "--cache-type-k", default="f32", help="key cache type: f32, f16, bf16, q8_0, q4_0, iq4_nl")
        p.add_argument("-ctv", "--cache-type-v", default="f32", help="value cache type: f32, f16, bf16, q8_0, q4_0, iq4_nl")
        p.add_argument("--cache-rotate", choices=("on", "off"),
                       help="Hadamard-rotate heads before storing (default: on only for q4_0 and iq4_nl)")
    return ap.parse_args(argv)


def chat(model: Model, args: argparse.Namespace) -> None:
    """Multi-turn chat on stdin/stdout; each turn reuses the cache for the conversation so far."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("User: ")
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        pieces = model.chat(messages, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)  # checks the flags: an error comes before the reply
        print("Assistant: ", end="", flush=True)
        reply = []
        for piece in pieces:
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        s = model.stats
        print(f"[{s.prompt_tokens} new prompt tokens processed, {s.cached_tokens} cached, "
              f"{s.generated_tokens} generated]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})
        if s.stop_reason == "context":
            print("[context full: start a new chat]", file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rotate = None if args.cache_rotate is None else args.cache_rotate == "on"
        model = Model(args.model, seq_len=args.context, cache_type_k=args.cache_type_k,
                      cache_type_v=args.cache_type_v, cache_rotate=rotate)
        if args.command == "chat":
            chat(model, args)
        else:
            pieces = model.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed)  # checks the flags
            print(args.prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
    except (ValueError, OSError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
