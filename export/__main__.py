"""python -m export SRC OUT [--dtype f32|q8_0|q4_0|q4_1] [--group-size 32] [--tokenizer PATH] [--seq-len N] [--no-key-mean]

SRC is a Hugging Face Llama folder, a Meta Llama folder, a GGUF file, a llama2.c checkpoint
(v0/v1/v2) or a kvc file; OUT is the kvc .bin to write. Without --dtype each matrix keeps the
type the source stores it in where kvc runs it (a Q4_1 GGUF stays Q4_1). The file carries the
model's key_mean (for iq4_nl KV caches), measured by running the engine (libkvc.so) on calibration
text, unless --no-key-mean.

Expected errors print one `error: ...` line and exit 1. SIGINT, SIGTERM and SIGHUP (unless
ignored, as under nohup) stop the export: the temp file is removed, one line says so and the exit
code is 128 + the signal's number (130, 143, 129).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .common import ExportError
from kvc.format import WEIGHT_TYPES, describe_types, tensor_types

from .convert import export_model
from .key_mean import CALIBRATION_TOKENS

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """A signal turned exception, so that the writer's cleanup runs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return "interrupted" if name == "SIGINT" else f"interrupted by {name}"


def _raise_interrupted(signum: int, frame) -> None:
    for name in SIGNALS:  # the first signal wins: a second one must not cut the cleanup short
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """While in the block, SIGINT, SIGTERM and SIGHUP raise Interrupted; ignored ones stay ignored.

    The process's handlers come back afterwards. Outside the main thread (where Python cannot
    set handlers) this does nothing.
    """
    old = {}
    if threading.current_thread() is threading.main_thread():
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m export", description="Convert a Llama checkpoint to a kvc .bin file.")
    p.add_argument("src", help="HF folder, Meta folder, .gguf file, llama2.c .bin or kvc .bin")
    p.add_argument("out", help="kvc .bin file to write")
    p.add_argument("--dtype", choices=list(WEIGHT_TYPES),
                   help="convert every matrix to this type (default: each as the source stores it, where kvc "
                        "runs that type; float types become f32, other quantized types q8_0)")
    p.add_argument("--group-size", type=int, help="q8_0 group size, with --dtype q8_0 (default 32)")
    p.add_argument("--tokenizer", help="sentencepiece .model, llama2.c tokenizer.bin or HF tokenizer.json "
                                       "(required for llama2.c checkpoints; replaces the source's own)")
    p.add_argument("--seq-len", type=int, help="context length to store (default: the source's; Meta: 2048)")
    p.add_argument("--no-key-mean", action="store_true",
                   help="write no key_mean (it centers iq4_nl cache keys; measuring it runs the model on "
                        f"{CALIBRATION_TOKENS} tokens of calibration text)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors print one `error: ...` line and return 1, a signal 128 + its number."""
    args = parse_args(argv)
    try:
        with signals_raise():
            model = export_model(args.src, args.out, args.dtype, args.group_size, args.tokenizer, args.seq_len,
                                 not args.no_key_mean)
            c = model.config
            types = describe_types(c, tensor_types(c, model.tensors))
            print(f"wrote {args.out}: {c.n_layers} layers, dim {c.dim}, vocab {c.vocab_size}, {types}")
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ExportError, ValueError, OSError) as e:  # FormatError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
