"""GGUF files (llama.cpp): llama architecture, any quantization the gguf package dequantizes.

GGUF stores attn_q/attn_k rows already in the interleaved RoPE layout (llama.cpp's converter
permutes HF weights on the way in), so no permutation happens here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kvc.format import (
    CONTROL, FLAG_ADD_BOS, FLAG_ADD_DUMMY_PREFIX, FLAG_BYTE_FALLBACK, FLAG_IGNORE_MERGES,
    FLAG_REMOVE_EXTRA_WHITESPACES,
    NORMAL, PRETOK_GPT2, PRETOK_LLAMA3, PRETOK_NONE, PRETOK_SMOLLM, TOK_BYTE_BPE, TOK_SENTENCEPIECE, UNKNOWN,
    USER_DEFINED, Config, Tokenizer,
)

from .common import ExportError, SourceModel, check_shape, empty_tensors, positive_int, progress_bar
from .tokenizers import LLAMA3_REGEX, PRETOKENIZERS, byte_level_decode

GGUF_MAGIC = b"GGUF"

# kvc name -> GGUF name inside blk.N
LAYER_TENSORS = {
    "rms_att": "attn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "rms_ffn": "ffn_norm",
    "w1": "ffn_gate",
    "w2": "ffn_down",
    "w3": "ffn_up",
}


def is_gguf(path: Path) -> bool:
    """A file starting with the GGUF magic."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _open(path: str | os.PathLike):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ExportError(f"{path}: cannot read GGUF ({e})") from None


class _Meta:
    """Typed access to a GGUF file's metadata."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise ExportError(f"GGUF metadata lacks {key}")
        return v


def _tensor(t) -> np.ndarray:
    """A GGUF tensor dequantized to float32 in torch's (out, in) layout."""
    import gguf

    shape = tuple(reversed([int(s) for s in t.shape]))
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ExportError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantized") from None
    return np.asarray(a, dtype=np.float32).reshape(shape)


def _bos_flag(meta: _Meta, kind: str, pretokenizer: int = PRETOK_NONE) -> int:
    """FLAG_ADD_BOS per tokenizer.ggml.add_bos_token, or llama.cpp's default when the key is absent.

    llama.cpp (src/llama-vocab.cpp, llama_vocab::impl::load) starts from add_bos = false, sets it
    for the sentencepiece model ("llama") and, among byte-level BPE pre-tokenizers, for the Llama 3
    family ("llama3", "llama-bpe", ...: LLAMA_VOCAB_PRE_TYPE_LLAMA3); the key then overrides it.
    """
    default = kind == "llama" or pretokenizer == PRETOK_LLAMA3
    return FLAG_ADD_BOS if meta.get("tokenizer.ggml.add_bos_token", default) else 0


def read_tokenizer(meta: _Meta) -> Tokenizer:
    """The kvc Tokenizer from GGUF metadata (tokenizer.ggml.*)."""
    kind = meta.need("tokenizer.ggml.model")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    n = len(tokens)
    types = [int(x) for x in meta.get("tokenizer.ggml.token_type", [NORMAL] * n)]
    if len(types) != n:
        raise ExportError(f"GGUF token_type has {len(types)} entries for {n} tokens")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if kind == "gpt2":
        pre_name = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre_name not in PRETOKENIZERS:
            raise ExportError(f"unsupported GGUF pre-tokenizer {pre_name!r}")
        pretok = PRETOKENIZERS[pre_name]
        pieces = [
            tok.encode("utf-8") if types[i] in (CONTROL, USER_DEFINED) else byte_level_decode(tok)
            for i, tok in enumerate(tokens)
        ]
        index = {tok: i for i, tok in enumerate(tokens)}
        merges = []
        for m in meta.need("tokenizer.ggml.merges"):
            a, _, b = m.partition(" ")
            if a not in index or b not in index:
                raise ExportError(f"GGUF merge {m!r} uses an unknown token")
            merges.append((index[a], index[b]))
        unk_id = int(unk) if unk is not None and types[int(unk)] == UNKNOWN else -1
        # llama.cpp's rule: the Llama 3 pre-tokenizer comes with ignore_merges, as in its tokenizer.json
        flags = _bos_flag(meta, kind, pretok) | (FLAG_IGNORE_MERGES if pretok == PRETOK_LLAMA3 else 0)
        return Tokenizer(pieces, [0.0] * n, types, TOK_BYTE_BPE, flags, pretok, unk_id, merges)
    if kind == "llama":
        scores = [float(s) for s in meta.need("tokenizer.ggml.scores")]
        if len(scores) != n:
            raise ExportError(f"GGUF scores has {len(scores)} entries for {n} tokens")
        flags = FLAG_BYTE_FALLBACK | _bos_flag(meta, kind)
        if meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default for sentencepiece
            flags |= FLAG_ADD_DUMMY_PREFIX
        if meta.get("tokenizer.ggml.remove_extra_whitespaces", False):
            flags |= FLAG_REMOVE_EXTRA_WHITESPACES
        unk_id = int(unk) if unk is not None else (types.index(UNKNOWN) if UNKNOWN in types else -1)
        pieces = [tok.encode("utf-8") for tok in tokens]
        return Tokenizer(pieces, scores, types, TOK_SENTENCEPIECE, flags, unk_id=unk_id)
    raise ExportError(f"unsupported GGUF tokenizer model {kind!r}")


def read_gguf(path: Path, with_tokenizer: bool = True) -> SourceModel:
    """Read a llama-architecture GGUF file, dequantizing every tensor to float32."""
    reader = _open(path)
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ExportError(f"unsupported architecture {arch}")
    p = "llama."
    dim = positive_int(meta.need(p + "embedding_length"), p + "embedding_length")
    n_heads = positive_int(meta.need(p + "attention.head_count"), p + "attention.head_count")
    n_kv = positive_int(meta.get(p + "attention.head_count_kv", n_heads), p + "attention.head_count_kv")
    head_dim = positive_int(meta.get(p + "attention.key_length", dim // n_heads), p + "attention.key_length")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ExportError("missing tensor token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(tensors["token_embd.weight"].shape[-1])
    if meta.get(p + "rope.scaling.type", "none") not in ("none", None):
        raise ExportError(f"unsupported rope scaling type {meta.get(p + 'rope.scaling.type')!r}")
    c = Config(
        dim=dim,
        hidden_dim=positive_int(meta.need(p + "feed_forward_length"), p + "feed_forward_length"),
        n_layers=positive_int(meta.need(p + "block_count"), p + "block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        seq_len=positive_int(meta.need(p + "context_length"), p + "context_length"),
        head_dim=head_dim,
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        shared_classifier="output.weight" not in tensors,
        bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
    )
    t = empty_tensors(c)
    names = [("token_embd.weight", "tok_embeddings", None), ("output_norm.weight", "rms_final", None)]
    if not c.shared_classifier:
        names.append(("output.weight", "wcls", None))
    for layer in range(c.n_layers):
        names += [(f"blk.{layer}.{g}.weight", k, layer) for k, g in LAYER_TENSORS.items()]
    with progress_bar(len(names), "dequantizing") as bar:
        for gname, name, layer in names:
            if gname not in tensors:
                raise ExportError(f"missing tensor {gname}")
            a = _tensor(tensors[gname])
            if layer is None:
                check_shape(gname, a, t[name].shape)
                t[name][...] = a
            else:
                check_shape(gname, a, t[name].shape[1:])
                t[name][layer] = a
            bar.update()
    tok = read_tokenizer(meta) if with_tokenizer and tokens is not None else None
    return SourceModel(c, t, tok, jinja=meta.get("tokenizer.chat_template"))


# ----------------------------------------------------------------------------------------------
# an HF tokenizer.json from GGUF metadata, for comparing kvc's tokenizer with HF `tokenizers`


def _hf_pre_tokenizer(pretok: int) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pretok == PRETOK_GPT2:
        return byte_level
    if pretok == PRETOK_SMOLLM:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    if pretok == PRETOK_LLAMA3:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    raise ExportError(f"no HF pre-tokenizer for kvc pre-tokenizer {pretok}")


def hf_tokenizer_json(gguf_path: str | os.PathLike) -> str:
    """A Hugging Face tokenizer.json (byte-level BPE) built from a GGUF file's gpt2 tokenizer.

    Vocab and merges stay in GPT-2's byte-to-unicode form; control and user-defined tokens become
    added_tokens (special for control). Load it with `tokenizers.Tokenizer.from_str`.
    """
    meta = _Meta(_open(gguf_path))
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ExportError("hf_tokenizer_json needs a GGUF with a gpt2 (byte-level BPE) tokenizer")
    pre_name = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre_name not in PRETOKENIZERS:
        raise ExportError(f"unsupported GGUF pre-tokenizer {pre_name!r}")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    types = [int(x) for x in meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] == CONTROL}
        for i, tok in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _hf_pre_tokenizer(PRETOKENIZERS[pre_name]),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": PRETOKENIZERS[pre_name] == PRETOK_LLAMA3,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in meta.need("tokenizer.ggml.merges")],
        },
    }
    return json.dumps(spec, ensure_ascii=False)
