"""Checkpoint export: Hugging Face, Meta, GGUF and llama2.c models -> one kvc .bin file."""
from .common import ExportError, SourceModel
from .convert import export_model, load_source

__all__ = ["ExportError", "SourceModel", "export_model", "load_source"]
