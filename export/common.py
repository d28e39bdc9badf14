"""Pieces shared by every source reader: the error type, the in-memory model, small helpers."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from kvc.format import ChatTemplate, Config, Tokenizer, tensor_shapes


class ExportError(Exception):
    """An expected problem with the input: reported as one `error: ...` line, no traceback."""


@dataclass
class SourceModel:
    """A model as read from a source (HF, Meta, GGUF, llama2.c or kvc file), ready for
    kvc.format.write_model; not the engine's kvc.Model, which runs a written file.

    `tensors` holds float32 arrays named and shaped as kvc.format.tensor_shapes(config);
    `tokenizer` is None when the source carries none (then --tokenizer is required);
    `jinja` is the source's chat template text, turned into `template` once the tokenizer is known.
    """

    config: Config
    tensors: dict[str, np.ndarray]
    tokenizer: Tokenizer | None = None
    template: ChatTemplate = field(default_factory=ChatTemplate)
    jinja: str | None = None


def warn(msg: str) -> None:
    """Print a one-line warning to stderr."""
    print(f"warning: {msg}", file=sys.stderr)


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)


def empty_tensors(config: Config) -> dict[str, np.ndarray]:
    """Uninitialized float32 arrays for every tensor of `config`, filled in by the readers."""
    return {name: np.empty(shape, dtype=np.float32) for name, shape in tensor_shapes(config)}


def check_shape(name: str, arr, shape: tuple[int, ...]) -> None:
    """Raise ExportError naming the source tensor `name` if `arr` does not have `shape`."""
    got = tuple(int(s) for s in arr.shape)
    if got != tuple(shape):
        raise ExportError(f"tensor {name} has shape {got}, expected {tuple(shape)}")


def permute_hf_rope(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Reorder q/k rows from HF's split-halves RoPE layout to the interleaved one.

    HF rotates pairs (j, j + hd/2) of each head; kvc, Meta and llama2.c rotate (2j, 2j + 1).
    `n_heads` is the number of heads in this projection: n_heads for wq, n_kv_heads for wk.
    """
    out, inp = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def positive_int(value, what: str) -> int:
    """`value` as an int > 0, or ExportError mentioning `what`."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ExportError(f"{what} is {value!r}, expected a positive integer") from None
    if v <= 0 or v != value:
        raise ExportError(f"{what} is {value!r}, expected a positive integer")
    return v
