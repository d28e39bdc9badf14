"""The KV cache's element types, exactly as run.c stores them, for the torch reference.

`roundtrip(x, type)` is what a float32 row comes back as after the C cache stored it: f16 and bf16
round to nearest even; q8_0 and q4_0 quantize each group of 32 values with an fp16 scale (GGML's
blocks; a group holding NaN or Inf comes back all NaN). `hadamard(x)` is the orthonormal rotation
run.c applies per head before storing when the cache rotates, with the same butterflies in the same
order, so both compute the same bits. `query_as_read` is the query as attention multiplies it with
int8 keys (quantized to int8 itself, so that scores are int8 dot products).
"""
from __future__ import annotations

import torch

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
GROUP = 32  # values per scale in q8_0 / q4_0


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x (..., n), n a power of two, times H / sqrt(n) (symmetric, orthonormal: it undoes itself)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"rotation needs a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    scale = torch.tensor(1.0, dtype=torch.float32) / torch.sqrt(torch.tensor(float(n), dtype=torch.float32))
    return x * scale


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    g = x.reshape(-1, GROUP)
    d = _fp16(g.abs().amax(dim=1) / torch.tensor(127.0))
    inv = torch.where(d > 0, torch.tensor(1.0) / d, torch.zeros_like(d))
    q = torch.round(g * inv[:, None]).clamp(-127, 127)  # torch.round: nearest even, as rintf
    q = q + 0.0  # an int8 has no -0: a value that rounds to zero is +0 times the scale
    return (q * d[:, None]).reshape(x.shape)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    g = x.reshape(-1, GROUP)
    idx = g.abs().argmax(dim=1, keepdim=True)  # the first value of largest magnitude, as run.c picks it
    peak = torch.gather(g, 1, idx)[:, 0]
    d = _fp16(peak / torch.tensor(-8.0))
    inv = torch.where(d != 0, torch.tensor(1.0) / d, torch.zeros_like(d))
    q = torch.floor(g * inv[:, None] + 8.5).clamp(0, 15)
    return ((q - 8) * d[:, None]).reshape(x.shape)


def roundtrip(x: torch.Tensor, cache_type: str) -> torch.Tensor:
    """x (..., n) as the cache gives it back after storing it as cache_type (groups along n); float32
    except for f32, which is x itself."""
    if cache_type == "f32":
        return x
    x = x.to(torch.float32)
    if cache_type == "f16":
        return _fp16(x)
    if cache_type == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    if x.shape[-1] % GROUP:
        raise ValueError(f"{cache_type} needs rows that are a multiple of {GROUP}")
    if cache_type == "q8_0":
        return _q8_0(x)
    if cache_type == "q4_0":
        return _q4_0(x)
    raise ValueError(f"unknown cache type {cache_type!r} (one of {', '.join(CACHE_TYPES)})")


def stored(x: torch.Tensor, cache_type: str, rotate: bool) -> torch.Tensor:
    """Heads x (..., head_dim) as attention sees them through the cache: rotated, stored, and rotated
    back (attention's q . k and sum of w v are unchanged by a rotation of both sides)."""
    if not rotate:
        return roundtrip(x, cache_type)
    return hadamard(roundtrip(hadamard(x), cache_type))


def _quantize_query(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) quantized per group of 32 as run.c quantizes activations (scale max|x| / 127 in
    float32, no fp16 rounding; x times 1 / scale rounded to nearest even), then dequantized."""
    g = x.reshape(-1, GROUP)
    s = g.abs().amax(dim=1) / torch.tensor(127.0)
    inv = torch.where(s > 0, torch.tensor(1.0) / s, torch.zeros_like(s))
    return (torch.round(g * inv[:, None]) * s[:, None]).reshape(x.shape)


def query_as_read(q: torch.Tensor, cache_type_k: str, rotate: bool) -> torch.Tensor:
    """Query heads q (..., head_dim) as attention multiplies them with the stored keys: run.c scores
    int8 keys (q8_0, q4_0) with an int8 query (quantized per 32 values, after the rotation when the
    cache rotates); other key types read the float32 query itself."""
    if cache_type_k not in ("q8_0", "q4_0"):
        return q
    q = q.to(torch.float32)
    if not rotate:
        return _quantize_query(q)
    return hadamard(_quantize_query(hadamard(q)))


def default_rotate(cache_type_k: str, cache_type_v: str, head_dim: int) -> bool:
    """run.c's default: rotate when a type is 4-bit and head_dim is a power of two."""
    return "q4_0" in (cache_type_k, cache_type_v) and head_dim & (head_dim - 1) == 0
