"""kvc.Sampler: the C engine's sampler (greedy, temperature, top-k, top-p) for logits from Python."""
from __future__ import annotations

import random

import numpy as np

from ._lib import ffi, last_error, load
from .checks import C_INT_MAX, SEED_MAX, float_arg, int_arg


class Sampler:
    """Picks token ids from logits as the CLI does: greedy at temperature 0, else softmax at
    `temperature` cut to the top_k most likely (0: all) and to the smallest set whose probability
    reaches top_p, drawn with a seeded generator (seed None: a random seed). Not thread-safe: one
    sampler per stream of tokens."""

    def __init__(self, vocab_size: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None):
        self.vocab_size = int_arg("vocab_size", vocab_size, 1, C_INT_MAX)
        top_k = int_arg("top_k", top_k, 0, C_INT_MAX)
        seed = random.getrandbits(63) | 1 if seed is None else int_arg("seed", seed, 0, SEED_MAX)
        temperature, top_p = float_arg("temperature", temperature), float_arg("top_p", top_p)
        self._lib = load()
        handle = self._lib.kvc_sampler_new(self.vocab_size, temperature, top_p, top_k, seed)
        if handle == ffi.NULL:
            raise ValueError(last_error())
        self._handle = ffi.gc(handle, self._lib.kvc_sampler_free)

    def sample_into(self, logits) -> int:
        """The next token from C float logits (a cffi `float *` of vocab_size values), which it
        overwrites with scratch. ValueError when they hold NaN or infinities."""
        token = self._lib.kvc_sample(self._handle, logits)
        if token < 0:
            raise ValueError(last_error())
        return token

    def sample(self, logits: np.ndarray) -> int:
        """The next token from a row of vocab_size logits (left unchanged)."""
        row = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
        if row.size != self.vocab_size:
            raise ValueError(f"expected {self.vocab_size} logits, got {row.size}")
        return self.sample_into(ffi.cast("float *", ffi.from_buffer(row)))
