"""llama2.c checkpoints (v0 legacy, v1 fp32, v2 q8_0) and kvc files (for re-export, e.g. to q8_0)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from kvc.format import LLAMA2C_MAGIC, MAGIC, FormatError, read_model, tensor_shapes

from .common import ExportError, Model


def is_kvc_file(path: Path) -> bool:
    """A kvc checkpoint (magic KVCM)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _expected_size(data: bytes) -> int:
    """Bytes a llama2.c checkpoint with this header must have; ExportError if the header is absurd."""
    if len(data) >= 8 and struct.unpack_from("<I", data, 0)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version not in (1, 2):
            raise ExportError(f"unsupported llama2.c version {version}")
        dim, hid, L, nh, nkv, V, T = struct.unpack_from("<7i", data, 8)
        shared = data[36] != 0
        gs = struct.unpack_from("<i", data, 37)[0] if version == 2 else 0
        header = 256
    else:
        if len(data) < 28:
            raise ExportError("file too short for a llama2.c checkpoint")
        dim, hid, L, nh, nkv, V, T = struct.unpack_from("<7i", data, 0)
        version, shared, gs, header = 0, V > 0, 0, 28
        V = abs(V)
    if min(dim, hid, L, nh, nkv, V, T) <= 0 or dim % nh or nh % nkv or (dim // nh) % 2:
        raise ExportError(f"not a llama2.c checkpoint (header dim={dim} hidden={hid} layers={L} "
                          f"heads={nh} kv_heads={nkv} vocab={V} seq_len={T})")
    if version == 2 and (gs <= 0 or dim % gs or hid % gs):
        raise ExportError(f"llama2.c v2 checkpoint has invalid group size {gs}")
    from kvc.format import Config

    c = Config(dim, hid, L, nh, nkv, V, T, shared_classifier=shared)
    size = header
    for name, shape in tensor_shapes(c):
        n = int(np.prod(shape))
        size += 4 * n if version != 2 or name.startswith("rms_") else n + 4 * (n // gs)
    if version == 0:
        size += 4 * T * c.head_dim  # the two freq_cis tables
    return size


def read_llama2c(path: Path) -> Model:
    """Read a llama2.c checkpoint (bos 1, eos 2, theta 10000, eps 1e-5; tokenizer comes separately),
    or a kvc file with its tokenizer and chat template."""
    if is_kvc_file(path):
        try:
            ck = read_model(path)
        except (FormatError, ValueError, struct.error) as e:
            raise ExportError(f"{path}: invalid kvc file ({e})") from None
        return Model(ck.config, dict(ck.tensors), ck.tokenizer, ck.template, ck.template.jinja or None)
    data = path.read_bytes()
    want = _expected_size(data)
    if len(data) != want:
        raise ExportError(f"{path}: llama2.c checkpoint should be {want} bytes, file has {len(data)}")
    try:
        ck = read_model(path)
    except (FormatError, ValueError, struct.error) as e:
        raise ExportError(f"{path}: invalid llama2.c checkpoint ({e})") from None
    ck.config.bos_id, ck.config.eos_id = 1, 2
    return Model(ck.config, dict(ck.tensors), None)
