"""kvc's checkpoint file: the one place in Python that knows its bytes.

A kvc file is a 256-byte little-endian header, then three sections, each starting on a 64-byte
boundary: the tokenizer, the chat template and the weights. HEADER_FIELDS below defines the header
(run.c's KvcHeader, README.md's table and kvc/_lib.py's Config are tested against it); `write_model`
and `read_model` are the sections' executable definition, and run.c's loader reads exactly this.
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
VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
INT32_MAX = 2**31 - 1  # the header's int fields
FLOAT32_MAX = float(np.finfo(np.float32).max)

# weight types
F32 = 0
Q8_0 = 1
WEIGHT_TYPES = {"f32": F32, "q8_0": Q8_0}

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
    ("config.weight_type", "i"),
    ("config.group_size", "i"),
    ("config.bos_id", "i"),
    ("config.eos_id", "i"),
    ("reserved", "i"),
    ("tokenizer.offset", "Q"),
    ("tokenizer.size", "Q"),
    ("chat.offset", "Q"),
    ("chat.size", "Q"),
    ("weights.offset", "Q"),
    ("weights.size", "Q"),
]
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
    weight_type: int = F32
    group_size: int = 0
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


@dataclass
class Checkpoint:
    config: Config
    tensors: dict[str, np.ndarray]  # float32, shapes as in tensor_shapes()
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


def is_norm(name: str) -> bool:
    return name.startswith("rms_")


def is_quantized(c: Config, name: str) -> bool:
    """Whether tensor `name` is stored as int8 values + scales (q8_0 matrices; norms stay float32)."""
    return c.weight_type == Q8_0 and not is_norm(name)


# ----------------------------------------------------------------------------------------------
# writing


def quantize_q8_0(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of `group_size` along rows: w ~= q * scale. Zero groups get scale 0."""
    groups = w.astype(np.float32).reshape(-1, group_size)
    amax = np.abs(groups).max(axis=1)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.round(groups / safe[:, None]).clip(-127, 127).astype(np.int8)
    return q.reshape(-1), scale


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
    norm_eps in (0, 1), a known weight type (q8_0 with a positive group size), bos/eos in the vocab
    or -1. run.c's check_config adds the engine's own size limits.
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
    if values["weight_type"] not in (F32, Q8_0):
        return f"unknown weight type {values['weight_type']}"
    if values["weight_type"] == Q8_0 and not 0 < values["group_size"] <= INT32_MAX:
        return "q8_0 needs a positive group size"
    for name in ("bos_id", "eos_id"):
        if not -1 <= values[name] < values["vocab_size"]:
            return f"{name} = {values[name]} is outside the vocab of {values['vocab_size']}"
    return None


def _check_tensors(config: Config, tensors: dict[str, np.ndarray]) -> None:
    """ValueError unless `tensors` has every tensor of `config`, shaped as tensor_shapes() says,
    of a float dtype, without NaN or Inf."""
    for name, shape in tensor_shapes(config):
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        a = np.asarray(tensors[name])
        if tuple(a.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(a.shape)}, expected {shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"tensor {name} has dtype {a.dtype}, expected a float type")
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {name} has NaN or Inf values")


def write_model(
    path: str | os.PathLike,
    config: Config,
    tensors: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    template: ChatTemplate | None = None,
    progress=None,
) -> None:
    """Write a kvc file atomically (temp file + rename): a failure leaves nothing at `path`.

    `tensors` maps the names of tensor_shapes() to arrays of those shapes (any float dtype, finite).
    With config.weight_type Q8_0 every matrix is quantized in groups of config.group_size.
    `progress`, if given, is called with each tensor name as it is written. The file gets the mode
    a new file gets (0666 less the umask). Any exception while writing, KeyboardInterrupt included,
    removes the temp file; for other signals the caller turns them into exceptions (as the export
    CLI does).
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
    if config.weight_type == Q8_0:
        gs = config.group_size
        for name, shape in tensor_shapes(config):
            if not is_norm(name) and shape[-1] % gs:
                raise ValueError(f"tensor {name}: row length {shape[-1]} is not a multiple of group size {gs}")

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
            arr = np.ascontiguousarray(np.asarray(tensors[name], dtype=np.float32))
            if is_quantized(config, name):
                q, s = quantize_q8_0(arr, config.group_size)
                _write_aligned(f, q.tobytes())
                _write_aligned(f, s.astype("<f4").tobytes())
            else:
                _write_aligned(f, arr.astype("<f4").tobytes())
            if progress:
                progress(name)
        w_size = f.tell() - w_off
        f.seek(0)
        f.write(pack_header(config, [(tok_off, len(tok_bytes)), (tmpl_off, len(tmpl_bytes)), (w_off, w_size)]))


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


def pack_header(config: Config, sections: list[tuple[int, int]]) -> bytes:
    """The header's HEADER.size bytes: `config`, and (offset, size) for each of SECTIONS."""
    values = {"magic": MAGIC, "version": VERSION, "reserved": 0}
    values.update((f"config.{name}", getattr(config, name)) for name in CONFIG_FIELDS)
    for name, (offset, size) in zip(SECTIONS, sections, strict=True):
        values[f"{name}.offset"], values[f"{name}.size"] = offset, size
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

    Quantized weights come back dequantized to float32.
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
    layout, end = _kvc_layout(cfg, h["weights.offset"])
    if end - h["weights.offset"] != h["weights.size"]:
        raise FormatError(f"weights section is {h['weights.size']} bytes, the header's config needs "
                          f"{end - h['weights.offset']}")
    tensors = {}
    for name, shape, off, scales in layout:
        if scales is None:
            tensors[name] = np.frombuffer(data, "<f4", int(np.prod(shape)), off).reshape(shape)
        else:
            tensors[name] = _dequantize(data, off, scales, shape, cfg.group_size)
    return Checkpoint(cfg, tensors, tok, tmpl)


def _kvc_layout(cfg: Config, offset: int) -> tuple[list[tuple[str, tuple[int, ...], int, int | None]], int]:
    """(name, shape, offset, scales offset or None) of each tensor of a kvc weights section starting at
    `offset`, and where it ends; FormatError if a q8_0 row is not made of whole groups."""
    layout, off = [], offset
    for name, shape in tensor_shapes(cfg):
        n = math.prod(shape)
        off += -off % ALIGN
        if is_quantized(cfg, name):  # int8 values, then the scales on the next 64-byte boundary
            if shape[-1] % cfg.group_size:
                raise FormatError(f"bad header: group_size = {cfg.group_size} does not divide {name}'s rows")
            scales = off + n + (-(off + n) % ALIGN)
            layout.append((name, shape, off, scales))
            off = scales + 4 * (n // cfg.group_size)
        else:
            layout.append((name, shape, off, None))
            off += 4 * n
    return layout, off


def _dequantize(data, values: int, scales: int, shape: tuple[int, ...], group_size: int) -> np.ndarray:
    """A q8_0 tensor as float32: int8 values at offset `values`, one float32 scale per group at `scales`."""
    n = int(np.prod(shape))
    q = np.frombuffer(data, np.int8, n, values).astype(np.float32)
    s = np.frombuffer(data, "<f4", n // group_size, scales)
    return (q.reshape(-1, group_size) * s[:, None]).reshape(shape)


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

    config: Config  # llama2.c's fixed theta 1e4, eps 1e-5, bos 1, eos 2; v2: Q8_0 and its group size
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
            n = int(np.prod(shapes[name]))
            off += n + 4 * (n // c.group_size) if is_quantized(c, name) else 4 * n  # no padding
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
                    rope_theta=10000.0, norm_eps=1e-5, shared_classifier=shared,
                    weight_type=Q8_0 if version == 2 else F32, group_size=gs, bos_id=1, eos_id=2)
    return Llama2cHeader(config, version, size)


def _read_llama2c(data: memoryview) -> Checkpoint:
    """llama2.c v0 (legacy, 28-byte header) and v1/v2 (256-byte header, magic "ak42")."""
    h = read_llama2c_header(data)
    c = h.config
    tensors = {}
    for name, shape, off in h.layout()[0]:
        if is_quantized(c, name):  # llama2.c's scales follow the int8 values without padding
            tensors[name] = _dequantize(data, off, off + int(np.prod(shape)), shape, c.group_size)
        else:
            tensors[name] = np.frombuffer(data, "<f4", int(np.prod(shape)), off).reshape(shape)
    return Checkpoint(c, tensors, None, ChatTemplate())


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
