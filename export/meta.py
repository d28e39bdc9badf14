"""Meta's original Llama folders: params.json + consolidated.NN.pth (model-parallel shards)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvc.format import Config

from .common import ExportError, SourceModel, check_shape, empty_tensors, positive_int, progress_bar
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
    return shards


def _gather(shards: list[dict], name: str, axis: int | None) -> np.ndarray:
    """One tensor from all shards: concatenated along `axis`, or the first copy if replicated."""
    parts = []
    for i, s in enumerate(shards):
        if name not in s:
            raise ExportError(f"missing tensor {name}" + (f" in shard {i}" if len(shards) > 1 else ""))
        parts.append(s[name].float().numpy())
    if axis is None or len(parts) == 1:
        return parts[0]
    try:
        return np.concatenate(parts, axis=axis)
    except ValueError:
        raise ExportError(f"tensor {name}: shards have incompatible shapes {[p.shape for p in parts]}") from None


def read_meta(folder: Path, with_tokenizer: bool = True) -> SourceModel:
    """Read a Meta Llama folder. Its q/k rows are already in the interleaved RoPE layout.

    The tokenizer is tokenizer.model in the folder or its parent unless `with_tokenizer` is False.
    """
    try:
        p = json.loads((folder / "params.json").read_text())
    except ValueError as e:
        raise ExportError(f"{folder / 'params.json'}: invalid JSON ({e})") from None
    shards = _load_shards(folder)
    try:
        dim = positive_int(p["dim"], "params.json dim")
        n_heads = positive_int(p["n_heads"], "params.json n_heads")
        n_kv = positive_int(p.get("n_kv_heads") or n_heads, "params.json n_kv_heads")
        hidden = meta_hidden_dim(dim, positive_int(p.get("multiple_of", 256), "params.json multiple_of"),
                                 p.get("ffn_dim_multiplier"))
        vocab = int(p.get("vocab_size", -1))
        if vocab <= 0:
            emb = shards[0].get("tok_embeddings.weight")
            if emb is None:
                raise ExportError("missing tensor tok_embeddings.weight")
            vocab = int(emb.shape[0])
        c = Config(
            dim=dim, hidden_dim=hidden, n_layers=positive_int(p["n_layers"], "params.json n_layers"),
            n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
            seq_len=positive_int(p.get("max_seq_len", DEFAULT_SEQ_LEN), "params.json max_seq_len"),
            rope_theta=float(p.get("rope_theta") or 10000.0),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            shared_classifier=False,
        )
    except KeyError as e:
        raise ExportError(f"params.json: missing {e.args[0]}") from None
    if dim % n_heads or n_heads % n_kv:
        raise ExportError(f"params.json: dim {dim}, {n_heads} heads, {n_kv} kv heads do not fit")
    if p.get("use_scaled_rope"):
        raise ExportError("params.json: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")

    t = empty_tensors(c)
    shapes = {k: v.shape for k, v in t.items()}
    with progress_bar(len(TOP_TENSORS) + c.n_layers * len(LAYER_TENSORS), "reading") as bar:
        for name, (meta_name, axis) in TOP_TENSORS.items():
            full = f"{meta_name}.weight"
            a = _gather(shards, full, axis)
            check_shape(full, a, shapes[name])
            t[name][...] = a
            bar.update()
        for layer in range(c.n_layers):
            for name, (meta_name, axis) in LAYER_TENSORS.items():
                full = f"layers.{layer}.{meta_name}.weight"
                a = _gather(shards, full, axis)
                check_shape(full, a, shapes[name][1:])
                t[name][layer] = a
                bar.update()
    tok = None
    if with_tokenizer:
        for f in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
            if f.is_file():
                tok = read_sentencepiece(f)
                break
    return SourceModel(c, t, tok)
