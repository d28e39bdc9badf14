"""A small, readable PyTorch Llama: the reference every C result is checked against.

It loads the same files the C engine loads (via kvc.format), runs quantized weights dequantized
exactly as run.c dequantizes them (kvc.format.as_float), and computes in float32 by default.
`forward(tokens, pos)` uses and fills a KV cache shaped like the C one, (n_layers, seq_len, kv_dim);
`forward_full(tokens)` recomputes everything from scratch with no cache. The two must agree.
With cache types (kvc.kvtypes), keys and values pass through the same rounding run.c's cache applies,
in both paths (iq4_nl keys less the file's key_mean, position 0 as kvtypes.SINK_TYPE, as run.c stores them).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .format import Checkpoint, Config, QuantizedTensor, as_float, read_model
from .kvtypes import default_rotate, query_as_read, stored_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def int8_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as run.c's int8 kernels take a matmul input: per `group` values of a row, scale max|x| / 127
    and each value rounded to a multiple of it (ties to even; an all-zero group stays zero)."""
    g = x.reshape(-1, group)
    scale = g.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(g * inverse) * scale).reshape(x.shape)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of each head by position * theta^(-2j/head_dim).

    x: (T, n_heads, head_dim); positions: (T,)
    """
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, hd/2)
    cos = torch.cos(angles).to(x.dtype)[:, None, :]
    sin = torch.sin(angles).to(x.dtype)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


class Llama:
    """Llama forward pass over a kvc Checkpoint's weights, as float32 values.

    With int8_inputs, the input of each quantized matrix is first rounded to int8 as run.c's kernels
    round it (int8_rows, in the matrix's groups), so that only float rounding separates the two.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, cache_type_k: str = "f32",
                 cache_type_v: str = "f32", cache_rotate: bool | None = None, int8_inputs: bool = False):
        self.config: Config = checkpoint.config
        self.dtype = dtype
        stored = {"wcls": checkpoint.tensors["tok_embeddings"], **checkpoint.tensors}  # shared: tok_embeddings
        self.input_groups = {name: t.group_size for name, t in stored.items()  # of each quantized matrix
                             if int8_inputs and isinstance(t, QuantizedTensor)}
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        self.cache_rotate = (default_rotate(cache_type_k, cache_type_v, checkpoint.config.head_dim)
                             if cache_rotate is None else cache_rotate)
        self.w = {k: torch.from_numpy(np.array(as_float(v))).to(dtype) for k, v in checkpoint.tensors.items()}
        if "wcls" not in self.w:
            self.w["wcls"] = self.w["tok_embeddings"]
        c = self.config
        self.drawn: torch.Tensor | None = None  # see forward_h2o
        self.k_cache = torch.zeros(c.n_layers, c.seq_len, c.kv_dim, dtype=dtype)
        self.v_cache = torch.zeros(c.n_layers, c.seq_len, c.kv_dim, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **kw) -> "Llama":
        return cls(read_model(path, tokenizer), **kw)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """q: (T, H, hd) at positions q_pos; k, v: (S, KVH, hd) at positions 0..S-1; causal."""
        c = self.config
        group = c.n_heads // c.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / (c.head_dim ** 0.5)
        mask = torch.arange(k.shape[0])[None, :] > q_pos[:, None]  # (T, S)
        scores = scores.masked_fill(mask[None], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if self.drawn is not None:  # forward_h2o's tally: the weight each key drew, all heads and queries
            self.drawn += weights.sum(dim=(0, 1)).double()
        return torch.einsum("hts,shd->thd", weights, v)

    def _matmul(self, x: torch.Tensor, name: str, layer: int | None = None) -> torch.Tensor:
        """x W^T for matrix `name` (one layer's), x rounded first as run.c does when asked (int8_inputs)."""
        w = self.w[name] if layer is None else self.w[name][layer]
        if name in self.input_groups:
            x = int8_rows(x, self.input_groups[name])
        return x @ w.T

    def _layers(self, tokens: list[int], pos: int, kv_source) -> torch.Tensor:
        c, w = self.config, self.w
        T = len(tokens)
        positions = torch.arange(pos, pos + T)
        x = w["tok_embeddings"][torch.tensor(tokens, dtype=torch.long)]
        for l in range(c.n_layers):
            h = rms_norm(x, w["rms_att"][l], c.norm_eps)
            q = rope(self._matmul(h, "wq", l).view(T, c.n_heads, c.head_dim), positions, c.rope_theta)
            k = rope(self._matmul(h, "wk", l).view(T, c.n_kv_heads, c.head_dim), positions, c.rope_theta)
            v = self._matmul(h, "wv", l).view(T, c.n_kv_heads, c.head_dim)
            q = query_as_read(q, self.cache_type_k, self.cache_rotate).to(self.dtype)  # int8 keys: an int8 query
            mean = w["key_mean"][l] if "key_mean" in w else None
            k = stored_rows(k, positions, self.cache_type_k, self.cache_rotate, mean).to(self.dtype)  # what the cache gives back
            v = stored_rows(v, positions, self.cache_type_v, self.cache_rotate).to(self.dtype)
            keys, values = kv_source(l, k, v)
            att = self.attention(q, keys, values, positions).reshape(T, c.q_dim)
            x = x + self._matmul(att, "wo", l)
            h = rms_norm(x, w["rms_ffn"][l], c.norm_eps)
            x = x + self._matmul(torch.nn.functional.silu(self._matmul(h, "w1", l)) * self._matmul(h, "w3", l), "w2", l)
        x = rms_norm(x, w["rms_final"], c.norm_eps)
        return self._matmul(x, "wcls")

    @torch.no_grad()
    def forward(self, tokens: list[int], pos: int = 0) -> np.ndarray:
        """Logits (len(tokens), vocab) for tokens at positions pos.., writing K/V into the cache."""
        c = self.config
        if pos + len(tokens) > c.seq_len:
            raise IndexError("past the context length")

        def cached(l, k, v):
            end = pos + len(tokens)
            self.k_cache[l, pos:end] = k.reshape(len(tokens), c.kv_dim)
            self.v_cache[l, pos:end] = v.reshape(len(tokens), c.kv_dim)
            shape = (end, c.n_kv_heads, c.head_dim)
            return self.k_cache[l, :end].view(shape), self.v_cache[l, :end].view(shape)

        return self._layers(tokens, pos, cached).float().numpy()

    @torch.no_grad()
    def forward_full(self, tokens: list[int]) -> np.ndarray:
        """Logits for tokens at positions 0.. recomputed from scratch, no cache touched."""
        return self._layers(tokens, 0, lambda l, k, v: (k, v)).float().numpy()

    @torch.no_grad()
    def forward_reading(self, tokens: list[int], keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Logits for tokens at positions 0.. whose attention reads the given keys and values,
        (n_layers, >= len(tokens), kv_dim) as kvc.Model.kv_cache returns them, instead of its own:
        checks that an engine's attention reads exactly what its cache holds."""
        c, T = self.config, len(tokens)
        shape = (T, c.n_kv_heads, c.head_dim)

        def given(l, k, v):
            return (torch.from_numpy(np.ascontiguousarray(keys[l, :T])).to(self.dtype).view(shape),
                    torch.from_numpy(np.ascontiguousarray(values[l, :T])).to(self.dtype).view(shape))

        return self._layers(tokens, 0, given).float().numpy()

    @torch.no_grad()
    def forward_window(self, tokens: list[int], window: int, sinks: int, block_size: int = 16) -> np.ndarray:
        """Logits for tokens at positions 0.., token by token, with the cache bounded as run.c bounds
        it (StreamingLLM): the first `sinks` positions stay; the others fill a window of `window`
        positions, and when it is full the next token first drops its oldest block_size. Each kept
        position is turned by RoPE at its place inside the cache (sinks 0..sinks-1, the window's
        positions sinks.. in order): a key whose place moves down is turned back by as much."""
        c = self.config
        sink_kv = [[[], []] for _ in range(c.n_layers)]  # per layer: keys, values (1, n_kv_heads, head_dim) each
        window_kv = [[[], []] for _ in range(c.n_layers)]
        out = []
        for i, token in enumerate(tokens):
            if i >= sinks and len(window_kv[0][0]) == window:
                for l in range(c.n_layers):
                    keys, values = window_kv[l]
                    del keys[:block_size], values[:block_size]
                    back = torch.full((1,), -block_size)
                    window_kv[l][0] = [rope(k, back, c.rope_theta) for k in keys]
            place = i if i < sinks else sinks + len(window_kv[0][0])

            def kept(l, k, v):
                kv = sink_kv[l] if i < sinks else window_kv[l]
                kv[0].append(k)
                kv[1].append(v)
                return (torch.cat(sink_kv[l][0] + window_kv[l][0]), torch.cat(sink_kv[l][1] + window_kv[l][1]))

            out.append(self._layers([token], place, kept).float().numpy()[0])
        return np.array(out)

    @torch.no_grad()
    def forward_h2o(self, tokens: list[int], budget: int, recent: int) -> np.ndarray:
        """Logits for tokens at positions 0.., token by token, with at most `budget` positions kept as
        run.c keeps them (H2O): before a token comes to a full cache, the position that has drawn the
        least attention so far (summed over the tokens since it came, every layer and every query
        head; a tie to the older) among those before the last `recent` leaves. Each key keeps RoPE
        at its own position."""
        c = self.config
        kv = [[[], []] for _ in range(c.n_layers)]
        positions: list[int] = []
        scores: list[float] = []
        out = []
        for i, token in enumerate(tokens):
            if len(positions) == budget:
                victim = min((j for j, p in enumerate(positions) if p < i - recent), key=lambda j: (scores[j], positions[j]))
                for l in range(c.n_layers):
                    del kv[l][0][victim], kv[l][1][victim]
                del positions[victim], scores[victim]
            positions.append(i)
            scores.append(0.0)

            def kept(l, k, v):
                kv[l][0].append(k)
                kv[l][1].append(v)
                return torch.cat(kv[l][0]), torch.cat(kv[l][1])

            self.drawn = torch.zeros(len(positions), dtype=torch.float64)
            try:
                out.append(self._layers([token], i, kept).float().numpy()[0])
                scores = [s + float(d) for s, d in zip(scores, self.drawn)]
            finally:
                self.drawn = None
        return np.array(out)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """Greedy continuation of `prompt` (token by token after the prompt, using the cache)."""
        logits = self.forward(prompt, 0)
        out, pos = [], len(prompt)
        for _ in range(steps):
            nxt = int(np.argmax(logits[-1]))
            out.append(nxt)
            if pos >= self.config.seq_len:
                break
            logits = self.forward([nxt], pos)
            pos += 1
        return out
