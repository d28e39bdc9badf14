"""Shared test helpers: random Llama checkpoints with fixed seeds, written in kvc's format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvc import format as fmt


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


def write_random_model(path: Path, seed: int = 0, **kw) -> tuple[fmt.Config, dict[str, np.ndarray]]:
    defaults = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, seq_len=160)
    defaults.update(kw)
    cfg = fmt.Config(**defaults)
    tensors = random_tensors(cfg, seed)
    fmt.write_model(path, cfg, tensors, byte_tokenizer(cfg.vocab_size))
    return cfg, tensors
