"""Bytes one decode step reads (weights and K/V cache): tok/s times these is an effective bandwidth."""
from __future__ import annotations

import numpy as np

from ..format import Q8_0, Config, is_norm, tensor_shapes


def matrix_bytes(cfg: Config, n: int) -> int:
    """Bytes of an n-element weight matrix in the model's weight type."""
    if cfg.weight_type == Q8_0:
        return n + 4 * (n // cfg.group_size)  # int8 values + one f32 scale per group
    return 4 * n


def weight_bytes_per_token(cfg: Config) -> int:
    """Weight bytes one decode step reads: every layer matrix and norm, the classifier in full.

    With a tied classifier the embedding table is read in full as the classifier (its one-row
    lookup is not counted again); an untied model reads one embedding row plus its classifier.
    """
    total = 0
    for name, shape in tensor_shapes(cfg):
        n = int(np.prod(shape))
        if is_norm(name):
            total += 4 * n
        elif name == "tok_embeddings" and not cfg.shared_classifier:
            total += matrix_bytes(cfg, cfg.dim)
        else:
            total += matrix_bytes(cfg, n)
    return total


def kv_bytes_read(cfg: Config, pos: int) -> int:
    """K and V bytes attention reads for a token at position pos (entries 0..pos of every layer)."""
    return 2 * cfg.n_layers * (pos + 1) * cfg.kv_dim * 4
