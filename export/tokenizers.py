"""Tokenizer readers: sentencepiece .model, llama2.c tokenizer.bin and HF tokenizer.json -> kvc Tokenizer.

kvc stores pieces as raw bytes. Sentencepiece pieces keep their U+2581 ("▁") for spaces; byte-level
BPE pieces (GPT-2 style) are stored as the bytes they stand for, not in GPT-2's printable-unicode
disguise, while control and user-defined tokens (`<|im_end|>`) are stored as their literal UTF-8.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from kvc.format import (
    BYTE, CONTROL, FLAG_ADD_BOS, FLAG_ADD_DUMMY_PREFIX, FLAG_BYTE_FALLBACK, FLAG_IGNORE_MERGES,
    FLAG_REMOVE_EXTRA_WHITESPACES,
    NORMAL, PRETOK_GPT2, PRETOK_LLAMA3, PRETOK_SMOLLM, TOK_BYTE_BPE, TOK_SENTENCEPIECE,
    UNKNOWN, USER_DEFINED, FormatError, Tokenizer, read_tokenizer_bin,
)

from .common import ExportError, read_json, show

# The Llama 3 pre-tokenizer regex, as in Meta's tiktoken setup and HF's tokenizer.json.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF's tokenizer.ggml.pre names -> kvc pre-tokenizers
PRETOKENIZERS = {
    "smollm": PRETOK_SMOLLM,
    "gpt-2": PRETOK_GPT2,
    "gpt2": PRETOK_GPT2,
    "llama-bpe": PRETOK_LLAMA3,
    "llama3": PRETOK_LLAMA3,
}


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of bytes_to_unicode()."""
    return {c: b for b, c in bytes_to_unicode().items()}


def byte_level_decode(token: str) -> bytes:
    """A GPT-2 byte-level token string -> the raw bytes it stands for."""
    table = unicode_to_bytes()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:
        raise ExportError(f"token {token!r} is not in GPT-2's byte-level alphabet") from None


# ----------------------------------------------------------------------------------------------
# sentencepiece


def read_sentencepiece(path: str | os.PathLike, add_bos: bool = True) -> Tokenizer:
    """A sentencepiece BPE .model file: pieces, scores and types, flags from its normalizer spec.

    The model itself does not say whether prompts start with BOS; Llama and Mistral do (`add_bos`).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(Path(path).read_bytes())
    except Exception:
        raise ExportError(f"{path} is not a sentencepiece model") from None
    if not m.pieces:
        raise ExportError(f"{path} is not a sentencepiece model (no pieces)")
    model_type = pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)
    if model_type != "BPE":
        raise ExportError(f"{path}: sentencepiece model type {model_type} is not supported (only BPE)")
    if m.normalizer_spec.name not in ("identity", ""):
        raise ExportError(f"{path}: sentencepiece normalizer {m.normalizer_spec.name!r} is not supported")
    pieces = [p.piece.encode("utf-8") for p in m.pieces]
    scores = [float(p.score) for p in m.pieces]
    types = [int(p.type) for p in m.pieces]
    flags = 0
    if m.normalizer_spec.add_dummy_prefix:
        flags |= FLAG_ADD_DUMMY_PREFIX
    if m.normalizer_spec.remove_extra_whitespaces:
        flags |= FLAG_REMOVE_EXTRA_WHITESPACES
    if m.trainer_spec.byte_fallback:
        flags |= FLAG_BYTE_FALLBACK
    if add_bos:
        flags |= FLAG_ADD_BOS
    unk = types.index(UNKNOWN) if UNKNOWN in types else -1
    return Tokenizer(pieces, scores, types, TOK_SENTENCEPIECE, flags, unk_id=unk)


def is_sentencepiece(path: str | os.PathLike) -> bool:
    """True if `path` parses as a sentencepiece model with pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(Path(path).read_bytes())
    except Exception:
        return False
    return len(m.pieces) > 0 and all(p.piece for p in m.pieces[:16])


# ----------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


def read_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """llama2.c's tokenizer.bin, which must hold exactly `vocab_size` tokens."""
    try:
        tok = read_tokenizer_bin(path)
    except FormatError as e:
        raise ExportError(f"{path} is not a llama2.c tokenizer.bin ({e})") from None
    if len(tok.pieces) != vocab_size:
        raise ExportError(f"tokenizer {path} has {len(tok.pieces)} tokens but the model's vocab is {vocab_size}")
    return tok


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def _spec(value, what: str) -> dict:
    """An optional object of a tokenizer.json ({} when null); ExportError naming `what` if it is not one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExportError(f"{what} is {show(value)}, expected an object")
    return value


def _split_merge(m) -> tuple[str, str]:
    """A merge as "a b" or ["a", "b"] -> (a, b)."""
    if isinstance(m, str):
        a, sep, b = m.partition(" ")
        if sep:
            return a, b
    elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return m[0], m[1]
    raise ExportError(f"malformed merge {show(m)}")


def _steps(spec, key: str, what: str) -> list[dict]:
    """The steps of an HF normalizer or pre_tokenizer spec (named `what` in errors): a Sequence's list
    (under `key`: "normalizers" or "pretokenizers"), a single step alone, or none when the spec is null."""
    spec = _spec(spec, what)
    if not spec:
        return []
    steps = spec.get(key, []) if spec.get("type") == "Sequence" else [spec]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ExportError(f"{what} has malformed steps {show(steps)}")
    return steps


def _byte_level_pretokenizer(pre) -> int:
    """kvc's pre-tokenizer for an HF byte-level pre_tokenizer spec, or ExportError."""
    if pre is None:
        raise ExportError("byte-level BPE without a pre_tokenizer is not supported")
    steps = _steps(pre, "pretokenizers", "pre_tokenizer")
    kinds = [s.get("type") for s in steps]
    for s in steps:
        if s.get("type") == "ByteLevel" and s.get("add_prefix_space"):
            raise ExportError("ByteLevel add_prefix_space=true is not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return PRETOK_GPT2
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return PRETOK_SMOLLM
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern")
        if isinstance(pattern, dict) and pattern.get("Regex") == LLAMA3_REGEX:
            return PRETOK_LLAMA3
    raise ExportError(f"unsupported pre-tokenizer {json.dumps(pre)[:200]}")


def _adds_dummy_prefix(j: dict) -> bool:
    """True if an HF tokenizer.json puts U+2581 before the text (sentencepiece's add_dummy_prefix): a Prepend
    normalizer (Llama 2's HF conversion) or a Metaspace pre-tokenizer with prepend_scheme "always"."""
    prepends = any(n.get("type") == "Prepend" for n in _steps(j.get("normalizer"), "normalizers", "normalizer"))
    metaspace_always = any(p.get("type") == "Metaspace" and p.get("prepend_scheme") == "always"
                           for p in _steps(j.get("pre_tokenizer"), "pretokenizers", "pre_tokenizer"))
    return prepends or metaspace_always


def _post_processor_adds_bos(post) -> bool:
    """True if an HF post_processor prepends a special token (TemplateProcessing "<s> $A")."""
    post = _spec(post, "post_processor")
    if post.get("type") == "Sequence":
        processors = post.get("processors", [])
        if not isinstance(processors, list):
            raise ExportError(f"post_processor has malformed processors {show(processors)}")
        return any(_post_processor_adds_bos(p) for p in processors)
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        if not isinstance(single, list) or not all(isinstance(x, dict) for x in single):
            raise ExportError(f"post_processor has a malformed template {show(single)}")
        return bool(single) and "SpecialToken" in single[0]
    return False


def _is_id(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def _added_tokens(j: dict) -> dict[int, dict]:
    """tokenizer.json's added_tokens by id."""
    tokens = j.get("added_tokens") or []
    if not isinstance(tokens, list):
        raise ExportError(f"added_tokens is {show(tokens)}, expected an array")
    for t in tokens:
        if not isinstance(t, dict) or not _is_id(t.get("id")) or not isinstance(t.get("content"), str):
            raise ExportError(f"malformed added token {show(t)}")
    return {t["id"]: t for t in tokens}


def _vocab_by_id(model: dict, added: dict[int, dict]) -> tuple[dict[str, int], list[str]]:
    """The vocabulary (model.vocab and the added tokens) as {token: id} and as a list by id, whose
    ids must be exactly 0..n-1."""
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ExportError(f"model.vocab is {show(vocab)}, expected an object")
    ids = dict(vocab)
    for i, t in added.items():
        ids[t["content"]] = i
    if not ids:
        raise ExportError("the vocabulary is empty")
    by_id: list[str | None] = [None] * len(ids)
    for s, i in ids.items():
        if not _is_id(i):
            raise ExportError(f"token {show(s)} has id {show(i)}, expected an integer >= 0")
        if i < len(by_id):
            by_id[i] = s
    missing = next((i for i, s in enumerate(by_id) if s is None), None)
    if missing is not None:
        raise ExportError(f"token ids are not contiguous (id {missing} is missing)")
    return ids, by_id


def read_hf_tokenizer_json(path: str | os.PathLike, add_bos: bool | None = None) -> Tokenizer:
    """An HF tokenizer.json with a BPE model: byte-level (GPT-2, SmolLM, Llama 3) or
    sentencepiece-style with byte fallback (Llama 2's HF conversion).

    Prompts start with BOS if `add_bos`, or when None, if the post_processor prepends a special token.
    """
    j = read_json(Path(path))
    try:
        return _hf_tokenizer(j, add_bos)
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None


def _hf_tokenizer(j: dict, add_bos: bool | None) -> Tokenizer:
    """read_hf_tokenizer_json's work on the parsed file `j`; the caller puts the file's name before its errors."""
    model = _spec(j.get("model"), "model")
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {show(model.get('type'))} is not supported (only BPE)")
    added = _added_tokens(j)
    vocab, by_id = _vocab_by_id(model, added)
    n = len(by_id)
    merges_spec = model.get("merges") or []
    if not isinstance(merges_spec, list):
        raise ExportError(f"model.merges is {show(merges_spec)}, expected an array")
    merges = [_split_merge(m) for m in merges_spec]
    if add_bos is None:
        add_bos = _post_processor_adds_bos(j.get("post_processor"))
    bos_flag = FLAG_ADD_BOS if add_bos else 0
    types = [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL for i in range(n)]
    unk_tok = model.get("unk_token")
    if unk_tok is not None and not isinstance(unk_tok, str):
        raise ExportError(f"model.unk_token is {show(unk_tok)}, expected a string")
    unk = vocab.get(unk_tok, -1) if unk_tok else -1
    if unk >= 0:
        types[unk] = UNKNOWN

    if model.get("byte_fallback"):  # sentencepiece-style: pieces keep U+2581, scores from merge ranks
        scores = [-float(len(merges) + i) for i in range(n)]
        for rank, (a, b) in enumerate(merges):
            k = vocab.get(a + b)
            if k is not None and scores[k] < -rank:
                scores[k] = -float(rank)
        for i, s in enumerate(by_id):
            if types[i] == NORMAL and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                types[i] = BYTE
        flags = FLAG_BYTE_FALLBACK | bos_flag
        if _adds_dummy_prefix(j):
            flags |= FLAG_ADD_DUMMY_PREFIX
        pieces = [s.encode("utf-8") for s in by_id]
        return Tokenizer(pieces, scores, types, TOK_SENTENCEPIECE, flags, unk_id=unk)

    pretok = _byte_level_pretokenizer(j.get("pre_tokenizer"))
    pieces = [s.encode("utf-8") if i in added else byte_level_decode(s) for i, s in enumerate(by_id)]
    try:
        merge_ids = [(vocab[a], vocab[b]) for a, b in merges]
    except KeyError as e:
        raise ExportError(f"merge uses unknown token {e.args[0]!r}") from None
    flags = bos_flag | (FLAG_IGNORE_MERGES if model.get("ignore_merges") else 0)
    return Tokenizer(pieces, [0.0] * n, types, TOK_BYTE_BPE, flags, pretok, unk, merge_ids)


# ----------------------------------------------------------------------------------------------


def read_tokenizer(path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """Any supported tokenizer file, recognized by content: tokenizer.json, sentencepiece, tokenizer.bin."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"tokenizer {path} not found")
    head = path.read_bytes()[:1].lstrip()
    if path.suffix == ".json" or head == b"{":
        tok = read_hf_tokenizer_json(path)
    elif is_sentencepiece(path):
        tok = read_sentencepiece(path)
    else:
        return read_llama2c_tokenizer(path, vocab_size)
    if len(tok.pieces) != vocab_size:
        raise ExportError(f"tokenizer {path} has {len(tok.pieces)} tokens but the model's vocab is {vocab_size}")
    return tok
