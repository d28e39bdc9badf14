"""python -m export SRC OUT [--dtype f32|q8_0] [--group-size 32] [--tokenizer PATH] [--seq-len N]

SRC is a Hugging Face Llama folder, a Meta Llama folder, a GGUF file, a llama2.c checkpoint
(v0/v1/v2) or a kvc file; OUT is the kvc .bin to write.
"""
from __future__ import annotations

import argparse
import sys


from .common import ExportError
from .convert import export_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m export", description="Convert a Llama checkpoint to a kvc .bin file.")
    p.add_argument("src", help="HF folder, Meta folder, .gguf file, llama2.c .bin or kvc .bin")
    p.add_argument("out", help="kvc .bin file to write")
    p.add_argument("--dtype", choices=["f32", "q8_0"], default="f32", help="weight type (default f32)")
    p.add_argument("--group-size", type=int, default=32, help="q8_0 group size (default 32)")
    p.add_argument("--tokenizer", help="sentencepiece .model, llama2.c tokenizer.bin or HF tokenizer.json "
                                       "(required for llama2.c checkpoints; replaces the source's own)")
    p.add_argument("--seq-len", type=int, help="context length to store (default: the source's; Meta: 2048)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; expected errors print one `error: ...` line and return 1."""
    args = parse_args(argv)
    try:
        c = export_model(args.src, args.out, args.dtype, args.group_size, args.tokenizer, args.seq_len)
    except (ExportError, ValueError, OSError) as e:  # FormatError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {c.n_layers} layers, dim {c.dim}, vocab {c.vocab_size}, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
