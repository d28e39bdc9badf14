"""Meta's original Llama folders: params.json + consolidated.NN.pth (model-parallel shards)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvc.format import Config

from .common import (
    ExportError, SourceModel, check_float, positive_int, positive_number, read_json, read_tensors,
)
from .tokenizers import read_sentencepiece

DEFAULT_SEQ_LEN = 2048  # params.json rarely says; override with --seq-len

# kvc name -> (Meta name inside a layer or at top level, dimension along which shards are concatenated)
# Column-parallel weights split their output rows (dim 0), row-parallel ones their inputs (dim 1);
# tok_embeddings is a ParallelEmbedding split along the embedding dimension; norms are replicated.
LAYER_TENSORS = {
    "rms_att": ("attention_norm", None),
    "wq": ("attention.wq", 0),
    "wk": ("attention.wk", 0),
    "wv": ("attention.wv", 0),
    "wo": ("attention.wo", 1),
    "rms_ffn": ("ffn_norm", None),
    "w1": ("feed_forward.w1", 0),
    "w2": ("feed_forward.w2", 1),
    "w3": ("feed_forward.w3", 0),
}
TOP_TENSORS = {
    "tok_embeddings": ("tok_embeddings", 1),
    "rms_final": ("norm", None),
    "wcls": ("output", 0),
}


def is_meta_folder(path: Path) -> bool:
    """A folder with params.json."""
    return path.is_dir() and (path / "params.json").is_file()


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width the way Meta's model.py computes it."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _load_shards(folder: Path) -> list[dict]:
    import torch

    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise ExportError(f"{folder}: no consolidated.*.pth weights")
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise ExportError(f"{f}: cannot load ({e})") from None
        if not isinstance(shards[-1], dict):
            raise ExportError(f"{f}: not a state dict of tensors")
    return shards


def _parts(shards: list[dict], name: str) -> list:
    """Tensor `name` of every shard; ExportError if one lacks it or holds no float tensor there."""
    import torch

    parts = []
    for i, s in enumerate(shards):
        where = f" in shard {i}" if len(shards) > 1 else ""
        if name not in s:
            raise ExportError(f"missing tensor {name}{where}")
        t = s[name]
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"{name}{where} is a {type(t).__name__}, not a tensor")
        check_float(name, str(t.dtype).removeprefix("torch."), t.is_floating_point())
        parts.append(t)
    return parts


def _gathered_shape(shards: list[dict], name: str, axis: int | None) -> tuple[int, ...]:
    """The shape of tensor `name` once _gather() joins its shards, read from their metadata only."""
    shapes = [tuple(t.shape) for t in _parts(shards, name)]
    if axis is None or len(shapes) == 1:
        return shapes[0]
    if any(len(s) <= axis or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:] for s in shapes):
        raise ExportError(f"tensor {name}: shards have incompatible shapes {shapes}")
    return shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]


def _gather(shards: list[dict], name: str, axis: int | None) -> np.ndarray:
    """One tensor from all shards: concatenated along `axis`, or the first copy if replicated."""
    parts = [t.float().numpy() for t in _parts(shards, name)]
    if axis is None or len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=axis)


def _vocab_size(p: dict, shards: list[dict]) -> int:
    """params.json's vocab_size, or (when it is -1 or absent) the rows of tok_embeddings."""
    v = p.get("vocab_size", -1)
    if v is None or v == -1:
        return int(_gathered_shape(shards, "tok_embeddings.weight", 1)[0])
    return positive_int(v, "params.json: vocab_size")


def read_params(p: dict, shards: list[dict]) -> Config:
    """kvc Config from params.json's object `p` (the vocab from the weights when `p` has none)."""
    try:
        dim = positive_int(p["dim"], "params.json: dim")
        n_heads = positive_int(p["n_heads"], "params.json: n_heads")
        n_kv = positive_int(p.get("n_kv_heads") or n_heads, "params.json: n_kv_heads")
        multiplier = p.get("ffn_dim_multiplier")
        if multiplier is not None:
            multiplier = positive_number(multiplier, "params.json: ffn_dim_multiplier")
        hidden = meta_hidden_dim(dim, positive_int(p.get("multiple_of", 256), "params.json: multiple_of"), multiplier)
        c = Config(
            dim=dim, hidden_dim=positive_int(hidden, "params.json: FFN width"),
            n_layers=positive_int(p["n_layers"], "params.json: n_layers"),
            n_heads=n_heads, n_kv_heads=n_kv, vocab_size=_vocab_size(p, shards),
            seq_len=positive_int(p.get("max_seq_len", DEFAULT_SEQ_LEN), "params.json: max_seq_len"),
            rope_theta=positive_number(p.get("rope_theta") or 10000.0, "params.json: rope_theta"),
            norm_eps=positive_number(p.get("norm_eps", 1e-5), "params.json: norm_eps"),
            shared_classifier=False,
        )
    except KeyError as e:
        raise ExportError(f"params.json: missing {e.args[0]}") from None
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ExportError(f"params.json: dim {dim}, {n_heads} heads, {n_kv} kv heads do not fit")
    if p.get("use_scaled_rope"):
        raise ExportError("params.json: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    return c


def read_meta(folder: Path, with_tokenizer: bool = True) -> SourceModel:
    """Read a Meta Llama folder. Its q/k rows are already in the interleaved RoPE layout.

    The tokenizer is tokenizer.model in the folder or its parent unless `with_tokenizer` is False.
    """
    p = read_json(folder / "params.json")
    shards = _load_shards(folder)
    c = read_params(p, shards)
    top = {name: f"{meta_name}.weight" for name, (meta_name, _) in TOP_TENSORS.items()}
    per_layer = {name: f"layers.{{layer}}.{meta_name}.weight" for name, (meta_name, _) in LAYER_TENSORS.items()}
    axes = {name: axis for name, (_, axis) in {**TOP_TENSORS, **LAYER_TENSORS}.items()}

    t = read_tensors(c, top, per_layer, lambda s: _gathered_shape(shards, s.source, axes[s.name]),
                     lambda s: _gather(shards, s.source, axes[s.name]))
    tok = None
    if with_tokenizer:
        for f in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
            if f.is_file():
                tok = read_sentencepiece(f)
                break
    return SourceModel(c, t, tok)
