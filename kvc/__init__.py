"""kvc: a llama2.c-style inference engine in C, built around the KV cache, with a Python face.

`kvc.Model` runs the C engine (libkvc.so); `kvc.reference.Llama` is the PyTorch reference it is
tested against; `kvc.format` reads and writes the checkpoint files both use.
"""
from .format import Config
from .model import GenerationStats, Model

__all__ = ["Config", "GenerationStats", "Model"]
