"""llama2.c checkpoints (v0 legacy, v1 fp32, v2 q8_0) and kvc files (for re-export, e.g. to q8_0).
Their matrices come as stored (v2's and a kvc file's quantized ones as QuantizedTensors)."""
from __future__ import annotations

import struct
from pathlib import Path

from kvc.format import MAGIC, FormatError, QuantizedTensor, read_llama2c_header, read_model

from .common import ExportError, SourceModel, check_finite


def is_kvc_file(path: Path) -> bool:
    """A kvc checkpoint (magic KVCM)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _expected_size(data: bytes) -> int:
    """Bytes a llama2.c checkpoint with this header must have; ExportError if the header is absurd."""
    try:
        _, size = read_llama2c_header(data).layout()
    except FormatError as e:
        raise ExportError(str(e)) from None
    return size


WHOLE = ("tok_embeddings", "rms_final", "wcls")  # the tensors that are not stacked by layer


def _check_values(tensors: dict) -> None:
    """ExportError naming the tensor (and for float ones the layer) of the first NaN or Inf."""
    for name, a in tensors.items():
        if name in WHOLE or isinstance(a, QuantizedTensor):
            check_finite(name, a)
        else:
            for layer, part in enumerate(a):
                check_finite(f"{name} (layer {layer})", part)


def read_llama2c(path: Path) -> SourceModel:
    """Read a llama2.c checkpoint (bos 1, eos 2, theta 10000, eps 1e-5; tokenizer comes separately),
    or a kvc file with its tokenizer and chat template."""
    if is_kvc_file(path):
        try:
            ck = read_model(path)
        except (FormatError, ValueError, struct.error) as e:
            raise ExportError(f"{path}: invalid kvc file ({e})") from None
        _check_values(ck.tensors)
        return SourceModel(ck.config, dict(ck.tensors), ck.tokenizer, ck.template, ck.template.jinja or None)
    data = path.read_bytes()
    want = _expected_size(data)
    if len(data) != want:
        raise ExportError(f"{path}: llama2.c checkpoint should be {want} bytes, file has {len(data)}")
    try:
        ck = read_model(path)
    except (FormatError, ValueError, struct.error) as e:
        raise ExportError(f"{path}: invalid llama2.c checkpoint ({e})") from None
    _check_values(ck.tensors)
    return SourceModel(ck.config, dict(ck.tensors), None)
