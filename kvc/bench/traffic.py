"""Bytes one decode step reads (weights and K/V cache): tok/s times these is an effective bandwidth."""
from __future__ import annotations

import numpy as np

from ..format import F32, Config, is_norm, matrix_bytes, tensor_shapes


def weight_bytes_per_token(cfg: Config, types: dict[str, int]) -> int:
    """Weight bytes one decode step reads, each matrix in its type (`types` as format.read_types
    gives them): every layer matrix and norm, the classifier in full.

    With a tied classifier the embedding table is read in full as the classifier (its one-row
    lookup is not counted again); an untied model reads one embedding row plus its classifier.
    """
    total = 0
    for name, shape in tensor_shapes(cfg):
        n = cfg.dim if name == "tok_embeddings" and not cfg.shared_classifier else int(np.prod(shape))
        total += matrix_bytes(F32 if is_norm(name) else types[name], n, types["group_size"])
    return total


# KV cache element types: (values, bytes) per block, as run.c stores them (q8_0 / q4_0 / iq4_nl: 32
# values and one fp16 scale; iq4_nl's position 0, stored as q8_0, is left out)
CACHE_BLOCKS = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "iq4_nl": (32, 18)}


def cache_row_bytes(cache_type: str, n: int) -> int:
    """Bytes of n cached values (one position's keys or values) stored as cache_type."""
    values, nbytes = CACHE_BLOCKS[cache_type]
    return n // values * nbytes


def kv_bytes_read(cfg: Config, pos: int, type_k: str = "f32", type_v: str = "f32") -> int:
    """K and V bytes attention reads for a token at position pos (entries 0..pos of every layer)."""
    return cfg.n_layers * (pos + 1) * (cache_row_bytes(type_k, cfg.kv_dim) + cache_row_bytes(type_v, cfg.kv_dim))
