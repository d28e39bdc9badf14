"""Shared test helpers: the repository root, the `./run` runner, random Llama checkpoints with fixed seeds
written in kvc's format, and llama2.c's checkpoint and tokenizer.bin layouts (DESIGN.md section 2)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository root
if str(ROOT) not in sys.path:  # kvc and export import from this checkout (conftest imports helpers first)
    sys.path.insert(0, str(ROOT))

from kvc import format as fmt  # noqa: E402

# The executable run_cli runs by default: ./run, or the one $KVC_RUN names (`make test-sanitize` sets
# KVC_RUN=run_asan to run the CLI tests against the ASan+UBSan build).
RUN = ROOT / os.environ.get("KVC_RUN", "run")
TIMEOUT = 20  # seconds: a hang fails the test instead of stalling the suite
# A sanitized build (a name ending in _asan) is slower; its reports get exit codes of their own, so
# that a report can never pass for a clean exit (0) or a clean error (1).
SANITIZED_SLOWDOWN = 10
SANITIZER_EXIT_ASAN, SANITIZER_EXIT_UBSAN = 86, 87
SANITIZER_ENV = {
    "ASAN_OPTIONS": f"detect_leaks=1:exitcode={SANITIZER_EXIT_ASAN}:abort_on_error=0",
    "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:exitcode={SANITIZER_EXIT_UBSAN}",
}


def is_sanitized(exe: Path) -> bool:
    return Path(exe).name.endswith("_asan")


# ----------------------------------------------------------------------------------------------
# running the CLI


def run_cli(*args, exe: Path = RUN, stdin: bytes = b"", env: dict | None = None, threads: int = 1,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`./run` (or `exe`) with args, from the repository root; a hang fails the test.

    One OpenMP thread by default: on a busy 2-core box spinning threads can stall for seconds.
    A sanitized `exe` (see is_sanitized) runs with SANITIZER_ENV and SANITIZED_SLOWDOWN times the timeout.
    """
    assert exe.is_file(), f"{exe} not found: run `make all` (`make asan` for run_asan) first"
    sanitizer_env = SANITIZER_ENV if is_sanitized(exe) else {}
    if sanitizer_env:
        timeout *= SANITIZED_SLOWDOWN
    full_env = dict(os.environ, OMP_NUM_THREADS=str(threads), **{**sanitizer_env, **(env or {})})
    try:
        return subprocess.run([str(exe), *map(str, args)], input=stdin, capture_output=True, timeout=timeout,
                              env=full_env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{exe.name} {' '.join(map(str, args))} hung for more than {timeout} s")


def run_module(module: str, *args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root, its output as text; a hang fails the test."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------
# kvc checkpoints


def random_tensors(cfg: fmt.Config, seed: int) -> dict[str, np.ndarray]:
    """Weights with std ~0.2 (so greedy output varies) and norms 1 + 0.1 * randn (so a missing norm shows)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in fmt.tensor_shapes(cfg):
        if fmt.is_norm(name):
            tensors[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return tensors


def byte_tokenizer(vocab_size: int) -> fmt.Tokenizer:
    """A sentencepiece-kind vocab: <unk> <s> </s>, the 256 byte tokens, then filler pieces."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [fmt.UNKNOWN, fmt.CONTROL, fmt.CONTROL] + [fmt.BYTE] * 256
    pieces = pieces[:vocab_size]
    types = types[:vocab_size]
    while len(pieces) < vocab_size:
        pieces.append(f"\u2581w{len(pieces)}".encode())
        types.append(fmt.NORMAL)
    return fmt.Tokenizer(pieces, [0.0] * vocab_size, types, unk_id=0)


def write_random_model(path: Path, seed: int = 0, weight_type: int = fmt.F32, group_size: int = 32,
                       key_mean: bool = False, **kw) -> tuple[fmt.Config, dict[str, np.ndarray]]:
    """A random model at path, its matrices stored as weight_type (q8_0 in groups of group_size), with
    a random key_mean when asked; returns its config and its float weights (before quantization)."""
    defaults = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, seq_len=160)
    defaults.update(kw)
    cfg = fmt.Config(**defaults)
    tensors = random_tensors(cfg, seed)
    stored = fmt.quantize_model(tensors, weight_type, group_size)
    if key_mean:
        tensors[fmt.KEY_MEAN] = stored[fmt.KEY_MEAN] = \
            np.random.default_rng(seed + 1).standard_normal(fmt.key_mean_shape(cfg)).astype(np.float32)
    fmt.write_model(path, cfg, stored, byte_tokenizer(cfg.vocab_size))
    return cfg, tensors


# English text for the text tools (kvquality, longppl): ~700 bytes, one token each with the byte tokenizer
PANGRAMS = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 8


def model_and_text(folder: Path, **kw) -> Path:
    """folder with a random model (write_random_model's keywords), tiny.bin, and PANGRAMS in text.txt."""
    write_random_model(folder / "tiny.bin", **kw)
    (folder / "text.txt").write_text(PANGRAMS, encoding="utf-8")
    return folder


def decode_from_nan(model, tokens: list[int], prefill: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits at every position of tokens on a kvc.Model whose cache was reset to NaN (so that any
    read of an unwritten slot shows): a prefill of the first `prefill`, then one token at a time. Checks
    that the cache holds finite rows where it was written and NaN past them; returns (logits, keys, values)."""
    model.reset(fill=np.nan)
    n = len(tokens)
    logits = np.concatenate([model.forward(tokens[:prefill], 0)] +
                            [model.forward([t], prefill + i) for i, t in enumerate(tokens[prefill:])])
    keys, values = model.kv_cache
    assert np.isfinite(keys[:, :n]).all() and np.isfinite(values[:, :n]).all()
    assert np.isnan(keys[:, n:]).all() and np.isnan(values[:, n:]).all()  # nothing written past the sequence
    return logits, keys, values


def write_chat_model(path: Path, seed: int = 12, **kw) -> Path:
    """A random model whose byte tokenizer has <|im_start|>/<|im_end|> control tokens (ids 298, 299)
    and a ChatML template; config as write_random_model's, with kw in place."""
    defaults = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=256)
    cfg = fmt.Config(**dict(defaults, **kw))
    tok = byte_tokenizer(cfg.vocab_size)
    for i, piece in ((298, b"<|im_start|>"), (299, b"<|im_end|>")):
        tok.pieces[i], tok.types[i] = piece, fmt.CONTROL
    fmt.write_model(path, cfg, random_tensors(cfg, seed), tok,
                    fmt.ChatTemplate(fmt.CHAT_CHATML, end_of_turn=299, default_system="Be brief."))
    return path


# ----------------------------------------------------------------------------------------------
# llama2.c checkpoints and tokenizer.bin



def _f32(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def write_llama2c(path: Path, cfg: fmt.Config, t: dict[str, np.ndarray], version: int, group_size: int = 32) -> None:
    """llama2.c's export.py byte layouts: version 0 (legacy, 7-int header), 1 (fp32) or 2 (q8_0 with
    groups of `group_size`, fp32 norms). The classifier is written only when it is not shared."""
    classifier = [] if cfg.shared_classifier else ["wcls"]
    if version == 0:
        vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
        out = struct.pack("<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab, cfg.seq_len)
        out += b"".join(_f32(t[n]) for n in fmt.LLAMA2C_V0_ORDER)
        # freq_cis_real + freq_cis_imag: unused, and not zero, so a reader that used them would show
        out += _f32(np.full(cfg.seq_len * cfg.head_dim, 7.0))
        out += b"".join(_f32(t[n]) for n in classifier)
        path.write_bytes(out)
        return
    head = struct.pack("<Ii7iB", fmt.LLAMA2C_MAGIC, version, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                       cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len, int(cfg.shared_classifier))
    if version == 2:
        head += struct.pack("<i", group_size)
    out = head + bytes(256 - len(head))
    for n in fmt.LLAMA2C_V1_ORDER + classifier:
        if version == 2 and not fmt.is_norm(n):
            q, s = fmt.quantize_q8_0(t[n], group_size)
            out += q.tobytes() + _f32(s)
        else:
            out += _f32(t[n])
    path.write_bytes(out)


def write_tokenizer_bin(path: Path, pieces: list[bytes], scores: list[float], extra: bytes = b"") -> None:
    """llama2.c's tokenizer.bin: the longest piece's length, then (score, length, bytes) per piece, then
    `extra`. U+2581 is written as a space, as llama2.c's vocab has it."""
    assert len(pieces) == len(scores)
    pieces = [p.replace("\u2581".encode(), b" ") for p in pieces]
    out = struct.pack("<I", max(map(len, pieces)))
    for piece, score in zip(pieces, scores):
        out += struct.pack("<fI", score, len(piece)) + piece
    path.write_bytes(out + extra)


# ----------------------------------------------------------------------------------------------
# chat


def conversation(exchanges: list[tuple[str, str]], system: str | None) -> list[dict]:
    """Chat messages: the system message (if any), then each (user, reply) exchange, the last one
    without its reply (the model's turn)."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i, (user, reply) in enumerate(exchanges):
        msgs.append({"role": "user", "content": user})
        if i + 1 < len(exchanges):
            msgs.append({"role": "assistant", "content": reply})
    return msgs


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), in float64."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(p_logits.astype(np.float64)), softmax(q_logits.astype(np.float64))
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean())


def random_tokens(n: int, seed: int = 0, vocab: int = 300) -> list[int]:
    """n token ids below vocab (default: the random test models' 300), from seed."""
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()
