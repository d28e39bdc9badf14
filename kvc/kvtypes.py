"""The KV cache's element types, exactly as run.c stores them, for the torch reference.

`roundtrip(x, type)` is what a float32 row comes back as after the C cache stored it: f16 and bf16
round to nearest even; q8_0, q4_0 and iq4_nl quantize each group of 32 values with an fp16 scale
(GGML's blocks; a group holding NaN or Inf comes back all NaN); `iq4_nl_blocks` gives iq4_nl's
stored scales and levels themselves. `hadamard(x)` is the orthonormal rotation run.c applies per
head before storing when the cache rotates, with the same butterflies in the same order, so both
compute the same bits. `stored_rows` is what the cache gives back for rows at given positions: an
iq4_nl cache takes the model's key mean from its keys and stores position 0 as SINK_TYPE.
`query_as_read` is the query as attention multiplies it with int8 keys (quantized to int8 itself, so
that scores are int8 dot products).
"""
from __future__ import annotations

import torch

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "iq4_nl")
INT8_TYPES = ("q8_0", "q4_0", "iq4_nl")  # read by int8 kernels, with an int8 query
GROUP = 32  # values per scale in q8_0 / q4_0 / iq4_nl
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # GGML's kvalues_iq4nl
IQ4_NL_TRIALS = (-141, -134, -127, -120, -113, -106, 127, 120, 113, 106)  # scales tried: peak / t
SINK_TYPE = "q8_0"  # how an iq4_nl cache stores position 0


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


def _block_sum(s: torch.Tensor) -> torch.Tensor:
    """s (B, 32) summed per row in run.c's block_sum order: s[i] + s[i + w] for w = 16, 8, 4, 2, 1."""
    while s.shape[1] > 1:
        half = s.shape[1] // 2
        s = s[:, :half] + s[:, half:]
    return s[:, 0]


def _iq4_nl_assign(g: torch.Tensor, d: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Blocks g (B, 32) at scales d (B,): each value's nearest level index q (the midpoints below
    g / d; a tie goes to the lower level), sum (g - d L[q])^2 and sum g L[q], summed as run.c sums."""
    mids = (levels[:-1] + levels[1:]) / 2
    q = ((g / d[:, None])[..., None] > mids).sum(-1)
    e = g - d[:, None] * levels[q]
    return q, _block_sum(e * e), _block_sum(g * levels[q])


def iq4_nl_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., 32k) as run.c's store_iq4_nl stores it: the fp16 scales (B,) and level indices (B, 32)
    of its B blocks of 32 (a block with NaN or Inf: scale NaN, indices 0). For each trial scale
    d = f16(peak / t) (peak: the first value of largest magnitude) that is nonzero and finite: the
    nearest levels, d refit to f16(sum x L / sum L^2) and the levels chosen again when that is nonzero
    and finite; the smallest squared error wins, the first of equals. None: f16(peak / -127), level 8."""
    g = x.to(torch.float32).reshape(-1, GROUP)
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    finite = torch.isfinite(g).all(dim=1)
    g = torch.where(finite[:, None], g, torch.zeros_like(g))
    peak = torch.gather(g, 1, g.abs().argmax(dim=1, keepdim=True))[:, 0]
    best_d = (peak / torch.tensor(-127.0)).to(torch.float16)
    best_q = torch.full(g.shape, 8, dtype=torch.long)
    best_error = torch.zeros_like(peak)
    found = torch.zeros_like(finite)
    for t in IQ4_NL_TRIALS:
        d16 = (peak / torch.tensor(float(t))).to(torch.float16)
        d = d16.to(torch.float32)
        ok = (d != 0) & torch.isfinite(d)
        d = torch.where(ok, d, torch.ones_like(d))  # placeholders where not ok, never chosen
        q, error, xl = _iq4_nl_assign(g, d, levels)
        ll = (levels[q].to(torch.int64) ** 2).sum(dim=1).to(torch.float32)
        refit16 = (xl / ll).to(torch.float16)
        refit = refit16.to(torch.float32)
        use = (refit != 0) & torch.isfinite(refit)
        q2, error2, _ = _iq4_nl_assign(g, torch.where(use, refit, torch.ones_like(refit)), levels)
        d16 = torch.where(use, refit16, d16)
        q = torch.where(use[:, None], q2, q)
        error = torch.where(use, error2, error)
        win = ok & (~found | (error < best_error))
        found = found | ok
        best_d = torch.where(win, d16, best_d)
        best_q = torch.where(win[:, None], q, best_q)
        best_error = torch.where(win, error, best_error)
    best_d = torch.where(finite, best_d, torch.tensor(float("nan"), dtype=torch.float16))
    best_q = torch.where(finite[:, None], best_q, torch.zeros_like(best_q))
    return best_d, best_q


def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    d, q = iq4_nl_blocks(x)
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    return (levels[q] * d.to(torch.float32)[:, None]).reshape(x.shape)


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
    if cache_type == "iq4_nl":
        return _iq4_nl(x)
    raise ValueError(f"unknown cache type {cache_type!r} (one of {', '.join(CACHE_TYPES)})")


def stored(x: torch.Tensor, cache_type: str, rotate: bool) -> torch.Tensor:
    """Heads x (..., head_dim) as attention sees them through the cache: rotated, stored, and rotated
    back (attention's q . k and sum of w v are unchanged by a rotation of both sides)."""
    if not rotate:
        return roundtrip(x, cache_type)
    return hadamard(roundtrip(hadamard(x), cache_type))


def stored_rows(x: torch.Tensor, positions: torch.Tensor, cache_type: str, rotate: bool,
                mean: torch.Tensor | None = None) -> torch.Tensor:
    """Heads x (T, heads, head_dim) at positions (T,) as the cache gives them back: `stored`, except
    that an iq4_nl cache stores x less `mean` (heads, head_dim; None: none; run.c takes the model's
    key_mean from iq4_nl keys) and position 0 as SINK_TYPE."""
    if cache_type != "iq4_nl":
        return stored(x, cache_type, rotate)
    if mean is not None:
        x = x - mean.to(x.dtype)
    out = stored(x, cache_type, rotate)
    sink = positions == 0
    if sink.any():
        out[sink] = stored(x[sink], SINK_TYPE, rotate)
    return out


def _quantize_query(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) quantized per group of 32 as run.c quantizes activations (scale max|x| / 127 in
    float32, no fp16 rounding; x times 1 / scale rounded to nearest even), then dequantized."""
    g = x.reshape(-1, GROUP)
    s = g.abs().amax(dim=1) / torch.tensor(127.0)
    inv = torch.where(s > 0, torch.tensor(1.0) / s, torch.zeros_like(s))
    return (torch.round(g * inv[:, None]) * s[:, None]).reshape(x.shape)


def query_as_read(q: torch.Tensor, cache_type_k: str, rotate: bool) -> torch.Tensor:
    """Query heads q (..., head_dim) as attention multiplies them with the stored keys: run.c scores
    int8 keys (q8_0, q4_0, iq4_nl) with an int8 query (quantized per 32 values, after the rotation
    when the cache rotates); other key types read the float32 query itself."""
    if cache_type_k not in INT8_TYPES:
        return q
    q = q.to(torch.float32)
    if not rotate:
        return _quantize_query(q)
    return hadamard(_quantize_query(hadamard(q)))


def default_rotate(cache_type_k: str, cache_type_v: str, head_dim: int) -> bool:
    """run.c's default: rotate when a type is 4-bit (q4_0, iq4_nl) and head_dim is a power of two."""
    return bool({"q4_0", "iq4_nl"} & {cache_type_k, cache_type_v}) and head_dim & (head_dim - 1) == 0
