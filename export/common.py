"""Pieces shared by every source reader: the error type, the in-memory model, small helpers."""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvc.format import INT32_MAX, ChatTemplate, Config, QuantizedTensor, Tensor, Tokenizer, stack, tensor_shapes


class ExportError(Exception):
    """An expected problem with the input: reported as one `error: ...` line, no traceback."""


@dataclass
class SourceModel:
    """A model as read from a source (HF, Meta, GGUF, llama2.c or kvc file), ready for
    kvc.format.write_model; not the engine's kvc.Model, which runs a written file.

    `tensors` holds tensors named and shaped as kvc.format.tensor_shapes(config): float32 arrays,
    or QuantizedTensors for matrices kept in a quantized type the source stores them in;
    `tokenizer` is None when the source carries none (then --tokenizer is required);
    `jinja` is the source's chat template text, turned into `template` once the tokenizer is known.
    """

    config: Config
    tensors: dict[str, Tensor]
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


def check_shape(name: str, arr, shape: tuple[int, ...]) -> None:
    """Raise ExportError naming the source tensor `name` if `arr` (or a shape tuple) does not have `shape`."""
    got = tuple(int(s) for s in (arr if isinstance(arr, tuple) else arr.shape))
    if got != tuple(shape):
        raise ExportError(f"tensor {name} has shape {got}, expected {tuple(shape)}")


def check_float(name: str, dtype: str, is_float: bool) -> None:
    """Raise ExportError naming the source tensor `name` unless its type `dtype` is a float type."""
    if not is_float:
        raise ExportError(f"tensor {name} has dtype {dtype}, expected a float type")


def check_finite(name: str, t: Tensor) -> None:
    """Raise ExportError naming the tensor `name` if `t` (its scales and mins, when quantized) holds
    a NaN or an infinity."""
    arrays = t.arrays()[1:] if isinstance(t, QuantizedTensor) else [t]
    if not all(np.isfinite(a).all() for a in arrays):
        raise ExportError(f"tensor {name} has NaN or Inf values")


@dataclass(frozen=True)
class Slot:
    """One source tensor and where it goes: kvc tensor `name`, whole or, with `layer`, one layer of it."""

    source: str
    name: str
    layer: int | None = None


def slots(c: Config, top: dict[str, str], per_layer: dict[str, str]) -> Iterator[Slot]:
    """The source tensors of `c` in reading order. `top` and `per_layer` map kvc names to source names;
    per-layer names hold a `{layer}` field; wcls is skipped when the classifier is shared."""
    for name, source in top.items():
        if name != "wcls" or not c.shared_classifier:
            yield Slot(source, name)
    for layer in range(c.n_layers):
        for name, source in per_layer.items():
            yield Slot(source.format(layer=layer), name, layer)


def read_tensors(c: Config, top: dict[str, str], per_layer: dict[str, str],
                 shape_of: Callable[[Slot], tuple[int, ...]], load: Callable[[Slot], Tensor],
                 desc: str = "reading") -> dict[str, Tensor]:
    """Every tensor of `c` from a source described by its names (see slots()).

    First every source tensor's shape is checked with `shape_of` (metadata only; it raises
    ExportError for a missing or non-float tensor), so a config the files do not back is one error
    line before anything is allocated; then each is read with `load` and checked for NaN/Inf.
    `load` gives float arrays, written into one float32 array per tensor, or QuantizedTensors (all
    the slots of a tensor in one type), stacked by layer.
    """
    full = dict(tensor_shapes(c))

    def expected(s: Slot) -> tuple[int, ...]:
        return full[s.name] if s.layer is None else full[s.name][1:]

    for s in slots(c, top, per_layer):
        check_shape(s.source, shape_of(s), expected(s))
    t: dict[str, Tensor] = {}
    quantized: dict[str, list[QuantizedTensor]] = {}
    n = sum(1 for name in top if name != "wcls" or not c.shared_classifier) + c.n_layers * len(per_layer)
    with progress_bar(n, desc) as bar:
        for s in slots(c, top, per_layer):
            a = load(s)
            check_shape(s.source, a.shape, expected(s))
            check_finite(s.source, a)
            if isinstance(a, QuantizedTensor):
                quantized.setdefault(s.name, []).append(a)
            else:
                if s.name not in t:
                    t[s.name] = np.empty(full[s.name], dtype=np.float32)
                (t[s.name] if s.layer is None else t[s.name][s.layer])[...] = a
            bar.update()
    for name, parts in quantized.items():
        t[name] = parts[0] if name in top else stack(parts)
    return t


def permute_hf_rope(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Reorder q/k rows from HF's split-halves RoPE layout to the interleaved one.

    HF rotates pairs (j, j + hd/2) of each head; kvc, Meta and llama2.c rotate (2j, 2j + 1).
    `n_heads` is the number of heads in this projection: n_heads for wq, n_kv_heads for wk.
    """
    out, inp = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def show(value) -> str:
    """`value` for an error message: its repr, cut short."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def positive_int(value, what: str) -> int:
    """`value` as an int in 1..2^31-1 (what a kvc header holds), or ExportError mentioning `what`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value == int(value) and 0 < value <= INT32_MAX
    if not ok:
        raise ExportError(f"{what} is {show(value)}, expected a positive integer below 2^31")
    return int(value)


def positive_number(value, what: str) -> float:
    """`value` as a finite float > 0, or ExportError mentioning `what`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ExportError(f"{what} is {show(value)}, expected a positive number")
    return float(value)


def token_id(value, what: str) -> int:
    """`value` as a token id (an int >= 0), or ExportError mentioning `what`."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT32_MAX:
        raise ExportError(f"{what} is {show(value)}, expected a token id")
    return value


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; ExportError naming the file if it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def read_json(path: Path) -> dict:
    """The JSON object in `path`; ExportError naming the file if it is not UTF-8 JSON holding an object."""
    try:
        value = json.loads(read_text(path))
    except ValueError as e:
        raise ExportError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise ExportError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
