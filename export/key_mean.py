"""key_mean: each kv head's mean key after RoPE, which an iq4_nl KV cache takes from every key
before storing it (kvc/format.py's KEY_MEAN). Measured on the written model itself, run by the
engine over calibration text with an f32 cache."""
from __future__ import annotations

import argparse
import inspect
import os

import numpy as np

from kvc.bench.workload import FIXED_TEXT

CALIBRATION_TOKENS = 2048  # positions measured (fewer when the model's context is shorter)


def calibration_text() -> str:
    """Text every machine has offline, and not kvc.kvquality's evaluation text (Python's pydoc
    topics): kvc's own fixed English text, then the source of Python's argparse module."""
    return FIXED_TEXT + "\n\n" + inspect.getsource(argparse)


def measure_key_mean(path: str | os.PathLike) -> np.ndarray:
    """The mean key (n_layers, n_kv_heads, head_dim) of the kvc model at `path` over positions 1..n-1
    of the calibration text's first n tokens (position 0, BOS, is an iq4_nl cache's sink, kept apart)."""
    from kvc.model import Model

    with Model(path) as probe:
        n = min(CALIBRATION_TOKENS, probe.config.seq_len)
        tokens = probe.encode(calibration_text())[:n]
    with Model(path, seq_len=len(tokens), cache_type_k="f32", cache_type_v="f32", cache_rotate=False) as m:
        m.prefill(tokens)
        keys, _ = m.kv_cache_view()  # (n_layers, positions, n_kv_heads, head_dim)
        return keys[:, 1:].astype(np.float64).mean(axis=1).astype(np.float32)
