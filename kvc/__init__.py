"""kvc: a llama2.c-style inference engine in C, built around the KV cache, with a Python face.

`kvc.Model` runs the C engine (libkvc.so) on one sequence; `Model.pool()` gives a `kvc.Pool`, a
paged KV cache that many sequences share and run in batched steps; `kvc.Sampler` picks tokens from
logits; `kvc.reference.Llama` is the PyTorch reference the engine is tested against; `kvc.format`
reads and writes the checkpoint files both use.
"""
from .format import Config
from .model import GenerationStats, Model
from .pool import Pool, PoolFull, PoolSequence, PoolStats
from .sampler import Sampler

__all__ = ["Config", "GenerationStats", "Model", "Pool", "PoolFull", "PoolSequence", "PoolStats", "Sampler"]
