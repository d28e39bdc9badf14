"""GGUF files (llama.cpp): llama architecture, any quantization the gguf package dequantizes.

Matrices in a type kvc runs (F32, Q8_0, Q4_0, Q4_1) are kept as stored, block for block; the
float types (F16, BF16) become f32, and every other quantized type (K-quants, Q5_x, IQ...) is
dequantized and stored as q8_0 in groups of 32, the nearest kvc type that loses nothing of note,
with a warning naming the tensors. GGUF stores attn_q/attn_k rows already in the interleaved RoPE
layout (llama.cpp's converter permutes HF weights on the way in), so no permutation happens here.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from kvc.format import (
    CONTROL, FLAG_ADD_BOS, FLAG_ADD_DUMMY_PREFIX, FLAG_BYTE_FALLBACK, FLAG_IGNORE_MERGES,
    FLAG_REMOVE_EXTRA_WHITESPACES,
    NORMAL, PRETOK_GPT2, PRETOK_LLAMA3, PRETOK_NONE, PRETOK_SMOLLM, Q4_0, Q4_1, Q4_BLOCK, Q8_0, TOK_BYTE_BPE,
    TOK_SENTENCEPIECE, UNKNOWN, USER_DEFINED, Config, QuantizedTensor, Tensor, Tokenizer, is_norm,
    quantize,
)

from .common import (
    ExportError, Slot, SourceModel, check_float, positive_int, positive_number, read_tensors, slots, token_id, warn,
)
from .tokenizers import LLAMA3_REGEX, PRETOKENIZERS, byte_level_decode

GGUF_MAGIC = b"GGUF"

TOP_TENSORS = {"tok_embeddings": "token_embd.weight", "rms_final": "output_norm.weight", "wcls": "output.weight"}
LAYER_TENSORS = {
    "rms_att": "blk.{layer}.attn_norm.weight",
    "wq": "blk.{layer}.attn_q.weight",
    "wk": "blk.{layer}.attn_k.weight",
    "wv": "blk.{layer}.attn_v.weight",
    "wo": "blk.{layer}.attn_output.weight",
    "rms_ffn": "blk.{layer}.ffn_norm.weight",
    "w1": "blk.{layer}.ffn_gate.weight",
    "w2": "blk.{layer}.ffn_down.weight",
    "w3": "blk.{layer}.ffn_up.weight",
}
INT_TYPES = {"I8", "I16", "I32", "I64"}  # GGML tensor types that hold no float values
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}  # stored as f32
NATIVE = {"Q8_0": Q8_0, "Q4_0": Q4_0, "Q4_1": Q4_1}  # GGML block types kvc runs as stored
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}  # fp16 d, (fp16 m,) the values


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# what a metadata value must be -> (test, description)
KINDS = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
    "ints": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "an array of integers"),
    "numbers": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "an array of numbers"),
}


class _Meta:
    """Typed access to a GGUF file's metadata: every value is checked to be of the kind asked for."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, kind: str, default=None):
        """The value of `key` (default if absent); ExportError unless it is of `kind` (see KINDS)."""
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            v = f.contents()
        except UnicodeDecodeError:
            raise ExportError(f"GGUF metadata {key} is not valid UTF-8") from None
        test, desc = KINDS[kind]
        if not test(v):
            shown = f"an array of {len(v)}" if isinstance(v, list) else repr(v)[:60]
            raise ExportError(f"GGUF metadata {key} is {shown}, expected {desc}")
        return v

    def need(self, key: str, kind: str):
        """The value of `key`, which must be present."""
        v = self.get(key, kind)
        if v is None:
            raise ExportError(f"GGUF metadata lacks {key}")
        return v

    def positive_int(self, key: str, default: int | None = None) -> int:
        """The integer `key` (`default` when absent, if one is given), which must be in 1..2^31-1."""
        v = self.need(key, "int") if default is None else self.get(key, "int", default)
        return positive_int(v, f"GGUF metadata {key}")

    def positive_number(self, key: str, default: float) -> float:
        """The number `key` (`default` when absent), which must be finite and > 0."""
        return positive_number(self.get(key, "number", default), f"GGUF metadata {key}")


def _shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch's (out, in) order; ExportError for an integer tensor."""
    check_float(t.name, t.tensor_type.name, t.tensor_type.name not in INT_TYPES)
    return tuple(reversed([int(s) for s in t.shape]))


def _tensor(t) -> np.ndarray:
    """A GGUF tensor dequantized to float32 in torch's (out, in) layout."""
    import gguf

    shape = _shape(t)
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ExportError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantized") from None
    a = np.asarray(a, dtype=np.float32)
    if a.size != math.prod(shape):
        raise ExportError(f"tensor {t.name}: {a.size} values for shape {shape}")
    return a.reshape(shape)


def _blocks(t) -> QuantizedTensor:
    """A GGUF tensor of a NATIVE type as kvc stores it: its blocks' values and scales (and mins) split
    into arrays, nothing recomputed (Q8_0's fp16 scales become float32, exactly)."""
    shape, kind = _shape(t), t.tensor_type.name
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1)
    if blocks.size != math.prod(shape) // Q4_BLOCK * BLOCK_BYTES[kind]:
        raise ExportError(f"tensor {t.name}: {blocks.size} bytes of {kind} blocks for shape {shape}")
    blocks = blocks.reshape(-1, BLOCK_BYTES[kind])
    d = blocks[:, :2].copy().view(np.float16).reshape(-1)
    if kind == "Q8_0":
        return QuantizedTensor(Q8_0, shape, blocks[:, 2:].copy().view(np.int8).reshape(-1), d.astype(np.float32),
                               None, Q4_BLOCK)
    if kind == "Q4_0":
        return QuantizedTensor(Q4_0, shape, blocks[:, 2:].reshape(-1).copy(), d)
    return QuantizedTensor(Q4_1, shape, blocks[:, 4:].reshape(-1).copy(), d, blocks[:, 2:4].copy().view(np.float16).reshape(-1))


def _stored_types(c: Config, tensors: dict) -> dict[str, str]:
    """Each kvc matrix's source type: the GGUF type all its tensors share, "F32" when they are all
    of float types, else their types joined by "+"."""
    kinds: dict[str, set[str]] = {}
    for s in slots(c, TOP_TENSORS, LAYER_TENSORS):
        if not is_norm(s.name):
            kinds.setdefault(s.name, set()).add(tensors[s.source].tensor_type.name)
    return {name: k.pop() if len(k) == 1 else "F32" if k <= FLOAT_TYPES else "+".join(sorted(k))
            for name, k in kinds.items()}


def _bos_flag(meta: _Meta, kind: str, pretokenizer: int = PRETOK_NONE) -> int:
    """FLAG_ADD_BOS per tokenizer.ggml.add_bos_token, or llama.cpp's default when the key is absent.

    llama.cpp (src/llama-vocab.cpp, llama_vocab::impl::load) starts from add_bos = false, sets it
    for the sentencepiece model ("llama") and, among byte-level BPE pre-tokenizers, for the Llama 3
    family ("llama3", "llama-bpe", ...: LLAMA_VOCAB_PRE_TYPE_LLAMA3); the key then overrides it.
    """
    default = kind == "llama" or pretokenizer == PRETOK_LLAMA3
    return FLAG_ADD_BOS if meta.get("tokenizer.ggml.add_bos_token", "bool", default) else 0


def _tokens(meta: _Meta) -> list[str]:
    """tokenizer.ggml.tokens, which must be a non-empty array of strings."""
    tokens = meta.need("tokenizer.ggml.tokens", "strings")
    if not tokens:
        raise ExportError("GGUF metadata tokenizer.ggml.tokens is empty")
    return tokens


def _token_types(meta: _Meta, n: int) -> list[int]:
    """tokenizer.ggml.token_type (all NORMAL when absent), one per token."""
    types = meta.get("tokenizer.ggml.token_type", "ints", [NORMAL] * n)
    if len(types) != n:
        raise ExportError(f"GGUF token_type has {len(types)} entries for {n} tokens")
    return types


def _unknown_id(meta: _Meta, n: int) -> int | None:
    """tokenizer.ggml.unknown_token_id, None when absent; ExportError outside the vocabulary."""
    key = "tokenizer.ggml.unknown_token_id"
    unk = meta.get(key, "int")
    if unk is not None and not 0 <= unk < n:
        raise ExportError(f"GGUF metadata {key} is {unk}, outside the vocabulary of {n}")
    return unk


def _pretokenizer(meta: _Meta) -> int:
    """kvc's pre-tokenizer for tokenizer.ggml.pre (GPT-2's when absent)."""
    pre_name = meta.get("tokenizer.ggml.pre", "string", "gpt2")
    if pre_name not in PRETOKENIZERS:
        raise ExportError(f"unsupported GGUF pre-tokenizer {pre_name!r}")
    return PRETOKENIZERS[pre_name]


def _merge_ids(meta: _Meta, tokens: list[str]) -> list[tuple[int, int]]:
    """tokenizer.ggml.merges ("a b" strings) as pairs of token ids."""
    index = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for m in meta.need("tokenizer.ggml.merges", "strings"):
        a, _, b = m.partition(" ")
        if a not in index or b not in index:
            raise ExportError(f"GGUF merge {m!r} uses an unknown token")
        merges.append((index[a], index[b]))
    return merges


def read_tokenizer(meta: _Meta) -> Tokenizer:
    """The kvc Tokenizer from GGUF metadata (tokenizer.ggml.*)."""
    kind = meta.need("tokenizer.ggml.model", "string")
    tokens = _tokens(meta)
    n = len(tokens)
    types = _token_types(meta, n)
    unk = _unknown_id(meta, n)
    if kind == "gpt2":
        pretok = _pretokenizer(meta)
        pieces = [
            tok.encode("utf-8") if types[i] in (CONTROL, USER_DEFINED) else byte_level_decode(tok)
            for i, tok in enumerate(tokens)
        ]
        unk_id = unk if unk is not None and types[unk] == UNKNOWN else -1
        # llama.cpp's rule: the Llama 3 pre-tokenizer comes with ignore_merges, as in its tokenizer.json
        flags = _bos_flag(meta, kind, pretok) | (FLAG_IGNORE_MERGES if pretok == PRETOK_LLAMA3 else 0)
        return Tokenizer(pieces, [0.0] * n, types, TOK_BYTE_BPE, flags, pretok, unk_id, _merge_ids(meta, tokens))
    if kind == "llama":
        scores = [float(s) for s in meta.need("tokenizer.ggml.scores", "numbers")]
        if len(scores) != n:
            raise ExportError(f"GGUF scores has {len(scores)} entries for {n} tokens")
        flags = FLAG_BYTE_FALLBACK | _bos_flag(meta, kind)
        if meta.get("tokenizer.ggml.add_space_prefix", "bool", True):  # llama.cpp's default for sentencepiece
            flags |= FLAG_ADD_DUMMY_PREFIX
        if meta.get("tokenizer.ggml.remove_extra_whitespaces", "bool", False):
            flags |= FLAG_REMOVE_EXTRA_WHITESPACES
        unk_id = unk if unk is not None else (types.index(UNKNOWN) if UNKNOWN in types else -1)
        pieces = [tok.encode("utf-8") for tok in tokens]
        return Tokenizer(pieces, scores, types, TOK_SENTENCEPIECE, flags, unk_id=unk_id)
    raise ExportError(f"unsupported GGUF tokenizer model {kind!r}")


def read_config(meta: _Meta, tensors: dict) -> Config:
    """kvc Config from a llama GGUF's metadata (the vocab from token_embd when it has no tokens)."""
    arch = meta.get("general.architecture", "string")
    if arch != "llama":
        raise ExportError(f"unsupported architecture {arch}")
    p = "llama."
    dim = meta.positive_int(p + "embedding_length")
    n_heads = meta.positive_int(p + "attention.head_count")
    if "token_embd.weight" not in tensors:
        raise ExportError("missing tensor token_embd.weight")
    tokens = _tokens(meta) if "tokenizer.ggml.tokens" in meta.fields else None
    scaling = meta.get(p + "rope.scaling.type", "string", "none")
    if scaling != "none":
        raise ExportError(f"unsupported rope scaling type {scaling!r}")
    return Config(
        dim=dim,
        hidden_dim=meta.positive_int(p + "feed_forward_length"),
        n_layers=meta.positive_int(p + "block_count"),
        n_heads=n_heads,
        n_kv_heads=meta.positive_int(p + "attention.head_count_kv", n_heads),
        vocab_size=len(tokens) if tokens is not None else int(tensors["token_embd.weight"].shape[-1]),
        seq_len=meta.positive_int(p + "context_length"),
        head_dim=meta.positive_int(p + "attention.key_length", dim // n_heads),
        rope_theta=meta.positive_number(p + "rope.freq_base", 10000.0),
        norm_eps=meta.positive_number(p + "attention.layer_norm_rms_epsilon", 1e-5),
        shared_classifier="output.weight" not in tensors,
        bos_id=token_id(meta.get("tokenizer.ggml.bos_token_id", "int", 1), "GGUF metadata tokenizer.ggml.bos_token_id"),
        eos_id=token_id(meta.get("tokenizer.ggml.eos_token_id", "int", 2), "GGUF metadata tokenizer.ggml.eos_token_id"),
    )


def read_gguf(path: Path, with_tokenizer: bool = True) -> SourceModel:
    """Read a llama-architecture GGUF file: matrices of a NATIVE type as stored, the rest as float32
    and then (quantized sources) as q8_0 in groups of 32, which a warning names."""
    reader = _open(path)
    meta = _Meta(reader)
    tensors = {t.name: t for t in reader.tensors}
    c = read_config(meta, tensors)

    def shape_of(s: Slot) -> tuple[int, ...]:
        if s.source not in tensors:
            raise ExportError(f"missing tensor {s.source}")
        return _shape(tensors[s.source])

    for s in slots(c, TOP_TENSORS, LAYER_TENSORS):
        shape_of(s)  # a missing tensor is named before anything else is said about the types
    stored = _stored_types(c, tensors)

    def load(s: Slot) -> Tensor:
        t = tensors[s.source]
        return _blocks(t) if stored.get(s.name) in NATIVE else _tensor(t)

    t = read_tensors(c, TOP_TENSORS, LAYER_TENSORS, shape_of, load, "reading")
    converted = sorted(name for name, kind in stored.items() if kind not in NATIVE and kind not in FLOAT_TYPES)
    if converted:
        warn(f"no kvc kernel for {', '.join(f'{name} ({stored[name]})' for name in converted)}: stored as q8_0")
    for name in converted:
        t[name] = quantize(t[name], Q8_0, Q4_BLOCK)
    has_tokens = "tokenizer.ggml.tokens" in meta.fields
    tok = read_tokenizer(meta) if with_tokenizer and has_tokens else None
    return SourceModel(c, t, tok, jinja=meta.get("tokenizer.chat_template", "string"))


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
    if meta.get("tokenizer.ggml.model", "string") != "gpt2":
        raise ExportError("hf_tokenizer_json needs a GGUF with a gpt2 (byte-level BPE) tokenizer")
    pretok = _pretokenizer(meta)
    tokens = _tokens(meta)
    types = _token_types(meta, len(tokens))
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
        "pre_tokenizer": _hf_pre_tokenizer(pretok),
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
            "ignore_merges": pretok == PRETOK_LLAMA3,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in meta.need("tokenizer.ggml.merges", "strings")],
        },
    }
    return json.dumps(spec, ensure_ascii=False)
