"""kvc's checkpoint file: the one place in Python that knows its bytes.

A kvc file is a 256-byte little-endian header, then three sections, each starting on a 64-byte
boundary: the tokenizer, the chat template and the weights. HEADER_FIELDS below defines the header
(run.c's KvcHeader, README.md's table and kvc/_lib.py's Config are tested against it); `write_model`
and `read_model` are the sections' executable definition, and run.c's loader reads exactly this.
Each weight matrix has its own type (WEIGHT_TYPES): float32, or quantized as a QuantizedTensor
(`quantize` makes one from floats, `QuantizedTensor.dequantize` turns it back, as run.c reads it).
The weights section may end with one optional tensor, KEY_MEAN (float32, key_mean_shape()): each kv
head's mean key after RoPE, which an iq4_nl KV cache takes from every key before storing it (the
exporter measures it); the section's size says whether it is there.
llama2.c's v0/v1/v2 checkpoints and its tokenizer.bin are read here too (`read_llama2c_header` is
the one parser of their headers), so the torch reference can load every file the C engine loads.
"""
from __future__ import annotations

import math
import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"KVCM"
VERSION = 2  # 2: a weight type per matrix (1: one type, f32 or q8_0, for all); an optional key_mean
# ends the weights section (a reader that predates it refuses such a file on the section's size)
HEADER_BYTES = 256
ALIGN = 64
INT32_MAX = 2**31 - 1  # the header's int fields
FLOAT32_MAX = float(np.finfo(np.float32).max)

# weight types: how a matrix is stored (norms are always float32)
F32 = 0
Q8_0 = 1  # int8 q, one float32 scale s per group_size values of a row: x = q s
Q4_0 = 2  # GGUF's blocks of 32 values: 4-bit q, one float16 scale d a block: x = (q - 8) d
Q4_1 = 3  # the same with one float16 min m a block too: x = q d + m
WEIGHT_TYPES = {"f32": F32, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
Q4_BLOCK = 32  # values per q4_0 / q4_1 block
MATRICES = ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls")  # the tensors with a type

# tokenizer kinds
TOK_SENTENCEPIECE = 1  # score-driven BPE over characters, byte fallback (Llama 1/2, Mistral)
TOK_BYTE_BPE = 2  # rank-driven BPE over bytes with merges (GPT-2, SmolLM, Llama 3)

# tokenizer flags
FLAG_ADD_DUMMY_PREFIX = 1
FLAG_REMOVE_EXTRA_WHITESPACES = 2
FLAG_BYTE_FALLBACK = 4
FLAG_ADD_BOS = 8  # encoding a prompt starts with bos_id
FLAG_IGNORE_MERGES = 16  # byte-level BPE: a pre-token that is itself in the vocab is one token (Llama 3)

# pre-tokenizers for byte-level BPE
PRETOK_NONE = 0
PRETOK_GPT2 = 1
PRETOK_SMOLLM = 2  # each digit alone, then the GPT-2 regex
PRETOK_LLAMA3 = 3

# token types (sentencepiece's enum, which GGUF uses too)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# chat template styles run.c can render
CHAT_NONE = 0
CHAT_CHATML = 1
CHAT_LLAMA2 = 2
CHAT_LLAMA3 = 3

# The header, in file order: (field, struct code). This list is the layout's one definition:
# HEADER is built from it, and tests/test_format_layout.py checks run.c's KvcHeader, kvc/_lib.py's
# Config and README's table against it. Field names are KvcHeader's members: `config.*` is run.c's
# Config, whose fields are format.Config's, in the same order.
HEADER_FIELDS: list[tuple[str, str]] = [
    ("magic", "4s"),
    ("version", "I"),
    ("config.dim", "i"),
    ("config.hidden_dim", "i"),
    ("config.n_layers", "i"),
    ("config.n_heads", "i"),
    ("config.n_kv_heads", "i"),
    ("config.head_dim", "i"),
    ("config.vocab_size", "i"),
    ("config.seq_len", "i"),
    ("config.rope_theta", "f"),
    ("config.norm_eps", "f"),
    ("config.shared_classifier", "i"),
    ("config.bos_id", "i"),
    ("config.eos_id", "i"),
    ("reserved", "i"),
    ("tokenizer.offset", "Q"),
    ("tokenizer.size", "Q"),
    ("chat.offset", "Q"),
    ("chat.size", "Q"),
    ("weights.offset", "Q"),
    ("weights.size", "Q"),
    ("types.group_size", "i"),
] + [(f"types.{name}", "i") for name in MATRICES]
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
CONFIG_FIELDS = [name.removeprefix("config.") for name, _ in HEADER_FIELDS if name.startswith("config.")]
SECTIONS = ("tokenizer", "chat", "weights")  # in file order
assert HEADER.size <= HEADER_BYTES

TOKENIZER_HEADER = struct.Struct("<8I")  # kind, n_tokens, flags, pretokenizer, unk+1, n_merges, 0, 0


@dataclass(kw_only=True)
class Config:
    """Hyperparameters of a Llama model: the header's `config.*` fields, in their order."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 0  # 0: dim // n_heads
    vocab_size: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    shared_classifier: bool = True
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        self.shared_classifier = bool(self.shared_classifier)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim


assert [f.name for f in fields(Config)] == CONFIG_FIELDS, "Config's fields must be the header's, in its order"


@dataclass
class Tokenizer:
    """A vocabulary: pieces as raw bytes (sentencepiece pieces keep their U+2581), scores, types."""

    pieces: list[bytes]
    scores: list[float]
    types: list[int]
    kind: int = TOK_SENTENCEPIECE
    flags: int = FLAG_ADD_DUMMY_PREFIX | FLAG_BYTE_FALLBACK | FLAG_ADD_BOS
    pretokenizer: int = PRETOK_NONE
    unk_id: int = -1
    merges: list[tuple[int, int]] = field(default_factory=list)  # byte-level BPE, by rank


@dataclass
class ChatTemplate:
    """How to turn messages into a prompt: a style run.c renders, plus the source jinja text."""

    style: int = CHAT_NONE
    end_of_turn: int = -1  # token that ends an assistant reply
    default_system: str = ""  # used when the conversation has no system message
    jinja: str = ""


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A weight matrix, or a stack of them, in a quantized type, as a kvc file stores it.

    q8_0: `values` int8 and `scales` float32, one per `group_size` values of a row.
    q4_0 / q4_1: `values` uint8, 16 bytes a block of 32 values (byte j holds value j in its low
    nibble and value j + 16 in its high one, as GGUF's blocks do), `scales` float16 (d), one a block,
    and for q4_1 `mins` float16 (m). Every array is flat, in the row-major order of `shape`.
    """

    type: int
    shape: tuple[int, ...]
    values: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None
    group_size: int = Q4_BLOCK

    def arrays(self) -> list[np.ndarray]:
        """The arrays in file order: values, scales, then mins (q4_1)."""
        return [self.values, self.scales] + ([self.mins] if self.type == Q4_1 else [])

    def dequantize(self) -> np.ndarray:
        """The float32 values, each computed as run.c computes it (q s; (q - 8) d; q d + m)."""
        if self.type == Q8_0:
            x = self.values.astype(np.float32).reshape(-1, self.group_size) * self.scales.astype(np.float32)[:, None]
            return x.reshape(self.shape)
        nibbles = self.values.reshape(-1, 1, Q4_BLOCK // 2) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)
        q = (nibbles & 15).reshape(-1, Q4_BLOCK).astype(np.float32)
        d = self.scales.astype(np.float32)[:, None]
        x = (q - 8) * d if self.type == Q4_0 else q * d + self.mins.astype(np.float32)[:, None]
        return x.reshape(self.shape)


Tensor = np.ndarray | QuantizedTensor  # a weight as stored: float values (norms, f32 matrices) or quantized


def type_of(t: Tensor) -> int:
    """The weight type `t` is stored in."""
    return t.type if isinstance(t, QuantizedTensor) else F32


def as_float(t: Tensor) -> np.ndarray:
    """`t` as float32 values (quantized tensors dequantized)."""
    return t.dequantize() if isinstance(t, QuantizedTensor) else np.asarray(t, dtype=np.float32)


@dataclass
class Checkpoint:
    config: Config
    tensors: dict[str, Tensor]  # as stored (float32 arrays or QuantizedTensor), shapes as in tensor_shapes()
    tokenizer: Tokenizer | None
    template: ChatTemplate


def tensor_shapes(c: Config) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors in file order with their shapes; weight matrices are (out, in), rows contiguous."""
    L = c.n_layers
    shapes = [
        ("tok_embeddings", (c.vocab_size, c.dim)),
        ("rms_att", (L, c.dim)),
        ("wq", (L, c.q_dim, c.dim)),
        ("wk", (L, c.kv_dim, c.dim)),
        ("wv", (L, c.kv_dim, c.dim)),
        ("wo", (L, c.dim, c.q_dim)),
        ("rms_ffn", (L, c.dim)),
        ("w1", (L, c.hidden_dim, c.dim)),
        ("w2", (L, c.dim, c.hidden_dim)),
        ("w3", (L, c.hidden_dim, c.dim)),
        ("rms_final", (c.dim,)),
    ]
    if not c.shared_classifier:
        shapes.append(("wcls", (c.vocab_size, c.dim)))
    return shapes


KEY_MEAN = "key_mean"  # the optional last tensor of the weights section


def key_mean_shape(c: Config) -> tuple[int, int, int]:
    """KEY_MEAN's shape: (n_layers, n_kv_heads, head_dim), float32."""
    return (c.n_layers, c.n_kv_heads, c.head_dim)


def is_norm(name: str) -> bool:
    return name.startswith("rms_")


def parts(weight_type: int, n: int, group_size: int) -> list[tuple[str, int]]:
    """(numpy dtype, count) of each array an n-value matrix of `weight_type` is stored as, in file
    order: QuantizedTensor.arrays() for the quantized types."""
    if weight_type == F32:
        return [("<f4", n)]
    if weight_type == Q8_0:
        return [("i1", n), ("<f4", n // group_size)]
    return [("u1", n // 2)] + [("<f2", n // Q4_BLOCK)] * (2 if weight_type == Q4_1 else 1)


def matrix_bytes(weight_type: int, n: int, group_size: int) -> int:
    """Bytes of an n-value matrix of `weight_type` (without the padding between its arrays)."""
    return sum(np.dtype(dtype).itemsize * count for dtype, count in parts(weight_type, n, group_size))


# ----------------------------------------------------------------------------------------------
# quantizing


def quantize_q8_0(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of `group_size` along rows: w ~= q * scale. Zero groups get scale 0."""
    groups = w.astype(np.float32).reshape(-1, group_size)
    amax = np.abs(groups).max(axis=1)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.round(groups / safe[:, None]).clip(-127, 127).astype(np.int8)
    return q.reshape(-1), scale


def _quantize_q4(w: np.ndarray, weight_type: int) -> QuantizedTensor:
    """GGUF's q4_0 / q4_1 blocks, computed as ggml's reference quantizers do (bit for bit)."""
    blocks = w.astype(np.float32).reshape(-1, Q4_BLOCK)
    if weight_type == Q4_0:  # d from the value of largest magnitude, which becomes q = 0
        top = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)[:, 0]
        d, low, offset, mins = top / np.float32(-8), np.float32(0), np.float32(8.5), None
    else:  # d spans min..max in 15 steps
        low, high = blocks.min(axis=1), blocks.max(axis=1)
        d, offset, mins = (high - low) / np.float32(15), np.float32(0.5), low.astype(np.float16)
        low = low[:, None]
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc((blocks - low) * inv[:, None] + offset).clip(0, 15).astype(np.uint8)
    values = q[:, :Q4_BLOCK // 2] | (q[:, Q4_BLOCK // 2:] << 4)
    return QuantizedTensor(weight_type, tuple(w.shape), values.reshape(-1), d.astype(np.float16), mins)


def quantize(w: np.ndarray, weight_type: int, group_size: int = Q4_BLOCK) -> Tensor:
    """The float matrix `w` stored as `weight_type` (f32: float32 values; q8_0 in groups of
    `group_size`; q4 in blocks of 32). Rows must be whole groups."""
    w = np.asarray(w, dtype=np.float32)
    if weight_type == F32:
        return w
    gs = group_size if weight_type == Q8_0 else Q4_BLOCK
    if gs <= 0 or w.shape[-1] % gs:
        raise ValueError(f"rows of {w.shape[-1]} are not whole groups of {gs}")
    if weight_type == Q8_0:
        q, s = quantize_q8_0(w, gs)
        return QuantizedTensor(Q8_0, tuple(w.shape), q, s, None, gs)
    return _quantize_q4(w, weight_type)


def convert(t: Tensor, weight_type: int, group_size: int = Q4_BLOCK) -> Tensor:
    """`t` stored as `weight_type`: as it is when it already is (never quantized twice), else
    quantized from its float values."""
    if type_of(t) == weight_type and (weight_type != Q8_0 or t.group_size == group_size):
        return t
    return quantize(as_float(t), weight_type, group_size)


def quantize_model(tensors: dict[str, Tensor], weight_type: int, group_size: int = Q4_BLOCK) -> dict[str, Tensor]:
    """Every matrix of `tensors` converted to `weight_type`; norms (and a key_mean) stay float32."""
    return {name: t if is_norm(name) or name == KEY_MEAN else convert(t, weight_type, group_size)
            for name, t in tensors.items()}


def stack(layers: list[QuantizedTensor]) -> QuantizedTensor:
    """Quantized matrices of one type and shape stacked along a new first axis, as a kvc file stores
    a tensor's layers."""
    first = layers[0]
    arrays = [np.concatenate(column) for column in zip(*(t.arrays() for t in layers))]
    mins = arrays[2] if first.type == Q4_1 else None
    return QuantizedTensor(first.type, (len(layers), *first.shape), arrays[0], arrays[1], mins, first.group_size)


# ----------------------------------------------------------------------------------------------
# writing


def encode_tokenizer(t: Tokenizer) -> bytes:
    out = bytearray(
        TOKENIZER_HEADER.pack(
            t.kind, len(t.pieces), t.flags, t.pretokenizer, t.unk_id + 1, len(t.merges), 0, 0
        )
    )
    for piece, score, typ in zip(t.pieces, t.scores, t.types):
        out += struct.pack("<fII", score, typ, len(piece)) + piece
    for a, b in t.merges:
        out += struct.pack("<II", a, b)
    return bytes(out)


def encode_template(t: ChatTemplate) -> bytes:
    system = t.default_system.encode()
    jinja = t.jinja.encode()
    return (
        struct.pack("<Ii", t.style, t.end_of_turn)
        + struct.pack("<I", len(system)) + system
        + struct.pack("<I", len(jinja)) + jinja
    )


DIMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "seq_len")


def config_error(values: dict) -> str | None:
    """What makes a Config's fields (as a dict) no model a kvc header can hold, or None.

    Dims in 1..2^31-1, heads that divide, an even head_dim, finite positive float32 rope_theta,
    norm_eps in (0, 1), bos/eos in the vocab or -1. run.c's check_config adds the engine's own
    size limits.
    """
    for name in DIMS:
        if not 0 < values[name] <= INT32_MAX:
            return f"{name} = {values[name]} (must be 1..{INT32_MAX})"
    if values["n_heads"] % values["n_kv_heads"]:
        return f"n_heads = {values['n_heads']} is not a multiple of n_kv_heads = {values['n_kv_heads']}"
    if values["head_dim"] % 2:
        return f"head_dim = {values['head_dim']} is odd"
    if not (math.isfinite(values["rope_theta"]) and 0 < values["rope_theta"] <= FLOAT32_MAX):
        return f"rope_theta = {values['rope_theta']} (must be a positive float32)"
    if not 0 < values["norm_eps"] < 1:
        return f"norm_eps = {values['norm_eps']} (must be in (0, 1))"
    for name in ("bos_id", "eos_id"):
        if not -1 <= values[name] < values["vocab_size"]:
            return f"{name} = {values[name]} is outside the vocab of {values['vocab_size']}"
    return None


def types_error(config: Config, types: dict[str, int]) -> str | None:
    """What makes `types` (the header's types.* fields, without the prefix) wrong for `config`, or None.

    Each matrix of a known type whose rows are whole groups (q8_0: of group_size, positive; q4: of
    32); group_size 0 unless some matrix is q8_0; a shared classifier of tok_embeddings' type; and
    one int8 group for every quantized matrix (q8_0 beside q4 must use groups of 32), because run.c
    quantizes each matmul input once for all of them.
    """
    gs = types["group_size"]
    shapes = dict(tensor_shapes(config))
    groups = set()
    for name in MATRICES:
        t = types[name]
        if name == "wcls" and config.shared_classifier:
            if t != types["tok_embeddings"]:
                return f"the shared classifier's type {t} is not tok_embeddings' {types['tok_embeddings']}"
            continue
        if t not in WEIGHT_TYPES.values():
            return f"{name} has unknown weight type {t}"
        if t == F32:
            continue
        group = gs if t == Q8_0 else Q4_BLOCK
        cols = shapes[name][-1]
        if group <= 0 or cols % group:
            return (f"group_size = {gs} does not divide {name}'s rows of {cols}" if t == Q8_0
                    else f"{name}'s rows of {cols} are not whole {TYPE_NAMES[t]} blocks of {Q4_BLOCK}")
        groups.add(group)
    if len(groups) > 1:
        return f"q8_0 groups of {gs} cannot be mixed with q4 blocks of {Q4_BLOCK}"
    if gs and Q8_0 not in (types[name] for name in MATRICES):
        return f"group_size = {gs} but no matrix is q8_0"
    return None


TYPE_NAMES = {v: k for k, v in WEIGHT_TYPES.items()}


def tensor_types(config: Config, tensors: dict[str, Tensor]) -> dict[str, int]:
    """The header's types.* fields (without the prefix) for `tensors`: each matrix's type and the
    q8_0 group size (0 without q8_0 matrices); ValueError if the q8_0 matrices disagree on it."""
    names = [name for name, _ in tensor_shapes(config) if not is_norm(name)]
    q8_groups = {tensors[name].group_size for name in names if type_of(tensors[name]) == Q8_0}
    if len(q8_groups) > 1:
        raise ValueError(f"q8_0 matrices with different group sizes {sorted(q8_groups)}")
    types = {"group_size": q8_groups.pop() if q8_groups else 0}
    types.update((name, type_of(tensors[name])) for name in names)
    types["wcls"] = types.get("wcls", types["tok_embeddings"])
    return types


def describe_types(config: Config, types: dict[str, int]) -> str:
    """The matrices' types in a few words: the most common one, then the tensors of any other, e.g.
    "q8_0" or "q4_1, tok_embeddings q8_0" (a shared classifier is tok_embeddings)."""
    names = [name for name in MATRICES if name != "wcls" or not config.shared_classifier]
    counts = {t: sum(types[name] == t for name in names) for t in (types[name] for name in names)}
    main = max(counts, key=counts.get)
    return ", ".join([TYPE_NAMES[main]] + [f"{name} {TYPE_NAMES[types[name]]}" for name in names if types[name] != main])


def read_types(path: str | os.PathLike) -> dict[str, int]:
    """The weight types of a kvc (or llama2.c) checkpoint, from its header, as tensor_types() gives them."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:4] == MAGIC:
        if len(head) < HEADER_BYTES:
            raise FormatError("file too short for a kvc header")
        return header_types(unpack_header(head))
    return read_llama2c_header(head).types


def _check_tensors(config: Config, tensors: dict[str, Tensor]) -> None:
    """ValueError unless `tensors` has every tensor of `config`, shaped as tensor_shapes() says:
    norms and f32 matrices as arrays of a float dtype, quantized ones as QuantizedTensors whose
    arrays fit their shape, with no NaN or Inf in values, scales or mins."""
    for name, shape in tensor_shapes(config):
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        t = tensors[name]
        if isinstance(t, QuantizedTensor):
            if is_norm(name):
                raise ValueError(f"tensor {name} is a norm: it must be float values, not {TYPE_NAMES.get(t.type)}")
            if t.type not in (Q8_0, Q4_0, Q4_1):
                raise ValueError(f"tensor {name} has unknown weight type {t.type}")
            if tuple(t.shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            gs = t.group_size
            if gs <= 0 or shape[-1] % gs or (t.type != Q8_0 and gs != Q4_BLOCK):
                raise ValueError(f"tensor {name}: rows of {shape[-1]} are not whole {TYPE_NAMES[t.type]} groups of {gs}")
            arrays = t.arrays()
            for a, (dtype, count) in zip(arrays, parts(t.type, math.prod(shape), gs), strict=True):
                if a.size != count or a.dtype.kind != np.dtype(dtype).kind or a.dtype.itemsize != np.dtype(dtype).itemsize:
                    raise ValueError(f"tensor {name}: {a.dtype} array of {a.size} where {count} {dtype} belong")
            if not all(np.isfinite(a).all() for a in arrays[1:]):
                raise ValueError(f"tensor {name} has NaN or Inf scales")
            continue
        a = np.asarray(t)
        if tuple(a.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(a.shape)}, expected {shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"tensor {name} has dtype {a.dtype}, expected a float type")
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {name} has NaN or Inf values")
    if KEY_MEAN in tensors:
        a = np.asarray(tensors[KEY_MEAN])
        if tuple(a.shape) != key_mean_shape(config) or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"tensor {KEY_MEAN} is {a.dtype} {tuple(a.shape)}, expected float {key_mean_shape(config)}")
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {KEY_MEAN} has NaN or Inf values")


def write_model(
    path: str | os.PathLike,
    config: Config,
    tensors: dict[str, Tensor],
    tokenizer: Tokenizer,
    template: ChatTemplate | None = None,
    progress=None,
) -> None:
    """Write a kvc file atomically (temp file + rename): a failure leaves nothing at `path`.

    `tensors` maps the names of tensor_shapes() to tensors of those shapes, each written as it is:
    float arrays (any float dtype, finite) as float32, QuantizedTensors in their type (`quantize`
    and `quantize_model` make them); and optionally KEY_MEAN, written as float32 last. `progress`, if given, is called with each tensor name as it is
    written. The file gets the mode a new file gets (0666 less the umask). Any exception while
    writing, KeyboardInterrupt included, removes the temp file; for other signals the caller turns
    them into exceptions (as the export CLI does).
    """
    template = template or ChatTemplate()
    problem = config_error(asdict(config))
    if problem:
        raise ValueError(f"config: {problem}")
    if len(tokenizer.pieces) != config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer.pieces)} tokens but the model's vocab is {config.vocab_size}"
        )
    _check_tensors(config, tensors)
    types = tensor_types(config, tensors)
    problem = types_error(config, types)
    if problem:
        raise ValueError(problem)

    tok_bytes = encode_tokenizer(tokenizer)
    tmpl_bytes = encode_template(template)
    tok_off = HEADER_BYTES
    tmpl_off = tok_off + len(tok_bytes) + (-len(tok_bytes) % ALIGN)
    w_off = tmpl_off + len(tmpl_bytes) + (-len(tmpl_bytes) % ALIGN)

    with _atomic_file(Path(path)) as f:
        f.write(b"\0" * HEADER_BYTES)
        f.write(tok_bytes)
        f.write(b"\0" * (tmpl_off - f.tell()))
        f.write(tmpl_bytes)
        f.write(b"\0" * (w_off - f.tell()))
        for name, shape in tensor_shapes(config):
            t = tensors[name]
            arrays = t.arrays() if isinstance(t, QuantizedTensor) else [np.asarray(t)]
            for a, (dtype, _) in zip(arrays, parts(type_of(t), math.prod(shape), types["group_size"])):
                _write_aligned(f, np.ascontiguousarray(a, dtype=dtype).tobytes())
            if progress:
                progress(name)
        if KEY_MEAN in tensors:
            _write_aligned(f, np.ascontiguousarray(tensors[KEY_MEAN], dtype="<f4").tobytes())
        w_size = f.tell() - w_off
        f.seek(0)
        f.write(pack_header(config, [(tok_off, len(tok_bytes)), (tmpl_off, len(tmpl_bytes)), (w_off, w_size)], types))


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A new file next to `path`, renamed to `path` when the block ends, removed if it raises.

    Its name is chosen before it is created, so an exception at any point (a signal turned into
    one arriving right after the open, say) still finds it to remove. Mode 0666 less the umask.
    """
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue  # someone else's temp file: not ours to remove
        except OSError:
            raise  # nothing was created
        except BaseException:
            _remove(tmp)  # a signal turned exception: the open may have created it just before
            raise
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    """Delete `path` if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pack_header(config: Config, sections: list[tuple[int, int]], types: dict[str, int]) -> bytes:
    """The header's HEADER.size bytes: `config`, (offset, size) for each of SECTIONS, and `types`
    (tensor_types())."""
    values = {"magic": MAGIC, "version": VERSION, "reserved": 0}
    values.update((f"config.{name}", getattr(config, name)) for name in CONFIG_FIELDS)
    for name, (offset, size) in zip(SECTIONS, sections, strict=True):
        values[f"{name}.offset"], values[f"{name}.size"] = offset, size
    values.update((f"types.{name}", value) for name, value in types.items())
    return HEADER.pack(*(values[name] for name, _ in HEADER_FIELDS))


def unpack_header(data) -> dict:
    """The header at the start of `data` as {field: value}, fields named as in HEADER_FIELDS."""
    return dict(zip((name for name, _ in HEADER_FIELDS), HEADER.unpack_from(data, 0)))


def _write_aligned(f, data: bytes) -> None:
    f.write(b"\0" * (-f.tell() % ALIGN))
    f.write(data)


# ----------------------------------------------------------------------------------------------
# reading


class FormatError(ValueError):
    """The file is not a valid checkpoint or tokenizer."""


def read_model(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> Checkpoint:
    """Read a kvc file, or a llama2.c v0/v1/v2 checkpoint (whose tokenizer comes from `tokenizer_path`).

    Weights come back as stored: float32 arrays, and QuantizedTensors (`as_float` dequantizes them).
    """
    data = memoryview(Path(path).read_bytes())
    if len(data) >= 4 and bytes(data[:4]) == MAGIC:
        ck = _read_kvc(data)
        if tokenizer_path is not None:
            ck.tokenizer = read_tokenizer_bin(tokenizer_path, ck.config.vocab_size)
        return ck
    ck = _read_llama2c(data)
    if tokenizer_path is not None:
        ck.tokenizer = read_tokenizer_bin(tokenizer_path, ck.config.vocab_size)
    return ck


def _read_kvc(data: memoryview) -> Checkpoint:
    if len(data) < HEADER_BYTES:
        raise FormatError("file too short for a kvc header")
    h = unpack_header(data)
    if h["version"] != VERSION:
        raise FormatError(f"unsupported kvc version {h['version']}")
    values = {name: h[f"config.{name}"] for name in CONFIG_FIELDS}
    problem = config_error(values)
    if problem:
        raise FormatError(f"bad header: {problem}")
    cfg = Config(**values)
    types = header_types(h)
    problem = types_error(cfg, types)
    if problem:
        raise FormatError(f"bad header: {problem}")
    sections = {}
    for name in SECTIONS:
        off, size = h[f"{name}.offset"], h[f"{name}.size"]
        if off + size > len(data):
            raise FormatError(f"{name} section extends past the end of the file")
        sections[name] = data[off:off + size]
    tok = _decode_tokenizer(sections["tokenizer"])
    if len(tok.pieces) != cfg.vocab_size:
        raise FormatError(f"tokenizer has {len(tok.pieces)} tokens but the header's vocab is {cfg.vocab_size}")
    tmpl = _decode_template(sections["chat"])
    tensors, end = _read_tensors(data, cfg, types, h["weights.offset"], ALIGN, [name for name, _ in tensor_shapes(cfg)])
    size, need = h["weights.size"], end - h["weights.offset"]
    mean_at = end + (-end % ALIGN)
    mean_bytes = 4 * math.prod(key_mean_shape(cfg))
    if size != need:
        if size != mean_at - h["weights.offset"] + mean_bytes:
            raise FormatError(f"weights section is {size} bytes, the header's config needs {need} "
                              f"({mean_at - h['weights.offset'] + mean_bytes} with {KEY_MEAN})")
        mean = np.frombuffer(data, "<f4", mean_bytes // 4, mean_at).reshape(key_mean_shape(cfg))
        if not np.isfinite(mean).all():
            raise FormatError(f"{KEY_MEAN} has NaN or Inf values")
        tensors[KEY_MEAN] = mean
    return Checkpoint(cfg, tensors, tok, tmpl)


def header_types(h: dict) -> dict[str, int]:
    """The types.* fields of an unpacked header, without the prefix."""
    return {name.removeprefix("types."): value for name, value in h.items() if name.startswith("types.")}


def _read_tensors(data, cfg: Config, types: dict[str, int], offset: int, align: int,
                  names: list[str]) -> tuple[dict[str, Tensor], int]:
    """The tensors `names`, in that order from `offset`, each array of each starting on `align`
    bytes; and where they end. FormatError if the data ends first."""
    shapes, tensors, off = dict(tensor_shapes(cfg)), {}, offset
    for name in names:
        shape = shapes[name]
        t = F32 if is_norm(name) else types[name]
        arrays = []
        for dtype, count in parts(t, math.prod(shape), types["group_size"]):
            off += -off % align
            size = np.dtype(dtype).itemsize * count
            if off + size > len(data):
                raise FormatError(f"weights end inside {name}")
            arrays.append(np.frombuffer(data, dtype, count, off))
            off += size
        if t == F32:
            tensors[name] = arrays[0].reshape(shape)
        else:
            gs = types["group_size"] if t == Q8_0 else Q4_BLOCK
            tensors[name] = QuantizedTensor(t, shape, arrays[0], arrays[1], arrays[2] if t == Q4_1 else None, gs)
    return tensors, off


def _decode_tokenizer(buf: memoryview) -> Tokenizer:
    try:
        kind, n, flags, pretok, unk1, n_merges, _, _ = TOKENIZER_HEADER.unpack_from(buf, 0)
        off = TOKENIZER_HEADER.size
        pieces, scores, types = [], [], []
        for _ in range(n):
            score, typ, ln = struct.unpack_from("<fII", buf, off)
            off += 12
            if off + ln > len(buf):
                raise struct.error
            pieces.append(bytes(buf[off:off + ln]))
            scores.append(score)
            types.append(typ)
            off += ln
        merges = [struct.unpack_from("<II", buf, off + 8 * i) for i in range(n_merges)]
    except struct.error:
        raise FormatError("tokenizer section is truncated") from None
    return Tokenizer(pieces, scores, types, kind, flags, pretok, unk1 - 1, merges)


def _decode_template(buf: memoryview) -> ChatTemplate:
    try:
        style, eot = struct.unpack_from("<Ii", buf, 0)
        (n,) = struct.unpack_from("<I", buf, 8)
        (m,) = struct.unpack_from("<I", buf, 12 + n)
        if 16 + n + m > len(buf):
            raise struct.error
        system = bytes(buf[12:12 + n]).decode()
        jinja = bytes(buf[16 + n:16 + n + m]).decode()
    except struct.error:
        raise FormatError("chat template section is truncated") from None
    except UnicodeDecodeError:
        raise FormatError("chat template is not valid UTF-8") from None
    return ChatTemplate(style, eot, system, jinja)


LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's v1/v2 files
LLAMA2C_HEADER_BYTES = 256  # v1/v2
LLAMA2C_LEGACY_HEADER_BYTES = 28  # v0: 7 int32


# tensor order in llama2.c files; the classifier follows when unshared (v0: after the freq_cis tables)
LLAMA2C_V0_ORDER = ["tok_embeddings", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"]
LLAMA2C_V1_ORDER = ["rms_att", "rms_ffn", "rms_final", "tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass
class Llama2cHeader:
    """What a llama2.c checkpoint's header says, checked to describe a loadable model."""

    config: Config  # llama2.c's fixed theta 1e4, eps 1e-5, bos 1, eos 2
    types: dict[str, int]  # as tensor_types() gives them: every matrix f32, or (v2) q8_0 and its group size
    version: int  # 0 legacy (fp32, embeddings first), 1 fp32 (norms first), 2 int8 groups (norms first)
    size: int  # header bytes before the first tensor

    def layout(self) -> tuple[list[tuple[str, tuple[int, ...], int]], int]:
        """(name, shape, offset) of each tensor in file order, and the file size they add up to."""
        c = self.config
        shapes = dict(tensor_shapes(c))
        names = LLAMA2C_V0_ORDER + ["freq_cis"] if self.version == 0 else LLAMA2C_V1_ORDER
        if not c.shared_classifier:
            names = names + ["wcls"]
        tensors, off = [], self.size
        for name in names:
            if name == "freq_cis":  # v0's two unused RoPE tables, (seq_len, head_dim / 2) each
                off += 4 * c.seq_len * c.head_dim
                continue
            tensors.append((name, shapes[name], off))
            weight_type = F32 if is_norm(name) else self.types[name]
            off += matrix_bytes(weight_type, math.prod(shapes[name]), self.types["group_size"])  # no padding
        return tensors, off


def read_llama2c_header(data: bytes | memoryview) -> Llama2cHeader:
    """Parse llama2.c's v0 header (7 int32; a negative vocab means an unshared classifier) or its
    v1/v2 one (magic "ak42", version, 7 int32, uint8 shared classifier, v2: int32 group size).

    FormatError for a short file, an unknown version or dims that describe no model.
    """
    if len(data) >= 8 and struct.unpack_from("<I", data, 0)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version not in (1, 2):
            raise FormatError(f"unsupported llama2.c version {version}")
        if len(data) < LLAMA2C_HEADER_BYTES:
            raise FormatError("file too short for a llama2.c checkpoint")
        dim, hid, L, nh, nkv, V, T = struct.unpack_from("<7i", data, 8)
        shared = data[36] != 0
        gs = struct.unpack_from("<i", data, 37)[0] if version == 2 else 0
        size = LLAMA2C_HEADER_BYTES
    else:
        if len(data) < LLAMA2C_LEGACY_HEADER_BYTES:
            raise FormatError("file too short for a llama2.c checkpoint")
        dim, hid, L, nh, nkv, V, T = struct.unpack_from("<7i", data, 0)
        version, shared, gs, size = 0, V > 0, 0, LLAMA2C_LEGACY_HEADER_BYTES
        V = abs(V)
    if min(dim, hid, L, nh, nkv, V, T) <= 0 or dim % nh or nh % nkv or (dim // nh) % 2:
        raise FormatError(f"not a llama2.c checkpoint (header dim={dim} hidden={hid} layers={L} "
                          f"heads={nh} kv_heads={nkv} vocab={V} seq_len={T})")
    if version == 2 and (gs <= 0 or dim % gs or hid % gs):
        raise FormatError(f"llama2.c v2 checkpoint has invalid group size {gs}")
    config = Config(dim=dim, hidden_dim=hid, n_layers=L, n_heads=nh, n_kv_heads=nkv, vocab_size=V, seq_len=T,
                    rope_theta=10000.0, norm_eps=1e-5, shared_classifier=shared, bos_id=1, eos_id=2)
    types = {"group_size": gs} | dict.fromkeys(MATRICES, Q8_0 if version == 2 else F32)
    return Llama2cHeader(config, types, version, size)


def _read_llama2c(data: memoryview) -> Checkpoint:
    """llama2.c v0 (legacy, 28-byte header) and v1/v2 (256-byte header, magic "ak42")."""
    h = read_llama2c_header(data)
    tensors = {}
    for name, _, off in h.layout()[0]:  # llama2.c's q8_0 scales follow their int8 values without padding
        tensors.update(_read_tensors(data, h.config, h.types, off, 1, [name])[0])
    return Checkpoint(h.config, tensors, None, ChatTemplate())


def llama2c_piece_type(i: int, piece: bytes) -> int:
    """llama2.c's tokenizer.bin has no types: ids 0/1/2 are unk/bos/eos, <0xNN> are bytes."""
    if i == 0:
        return UNKNOWN
    if i in (1, 2):
        return CONTROL
    if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
        return BYTE
    return NORMAL


def read_tokenizer_bin(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """llama2.c's tokenizer.bin: uint32 max_token_length, then per token f32 score, uint32 len, bytes.

    Reads vocab_size tokens, or with None every record up to the end of the file (which must end
    on a record boundary). Its pieces have U+2581 replaced by spaces; kvc keeps sentencepiece's
    U+2581, so it is put back.
    """
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise FormatError(f"tokenizer {path} is too short")
    off = 4
    pieces, scores, types = [], [], []
    while True:
        i = len(pieces)
        if vocab_size is None:
            if off >= len(data):
                break
        elif i >= vocab_size:
            break
        if off + 8 > len(data):
            raise FormatError(f"tokenizer {path} ends after {i} of {vocab_size or 'its'} tokens")
        score, ln = struct.unpack_from("<fI", data, off)
        off += 8
        if off + ln > len(data):
            raise FormatError(f"tokenizer {path} is truncated at token {i}")
        piece = data[off:off + ln].replace(b" ", "\u2581".encode())
        off += ln
        pieces.append(piece)
        scores.append(score)
        types.append(llama2c_piece_type(i, piece))
    return Tokenizer(pieces, scores, types, unk_id=0)
