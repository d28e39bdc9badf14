"""kvc.Model: the C engine driven from Python — tokens in, numpy logits out, streaming text."""
from __future__ import annotations

import codecs
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ._lib import ffi, last_error, load
from .format import Config


@dataclass
class GenerationStats:
    """What the last generate()/chat() call did: tokens processed, reused and produced, and timings."""

    prompt_tokens: int = 0  # tokens run through the model before the first sampled one
    cached_tokens: int = 0  # prompt tokens whose K/V were already in the cache (chat turns)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "stop" (end token), "length" (max_tokens) or "context" (cache full)


class Model:
    """A checkpoint loaded by the C engine, with one sequence: its KV cache and run state.

    path: a kvc `.bin` (or a llama2.c checkpoint, with `tokenizer` naming its tokenizer.bin).
    seq_len: a context shorter than the model's, to shrink the KV cache. threads: OpenMP threads.
    config.seq_len is this sequence's context.
    cache_type_k, cache_type_v: how the KV cache stores keys and values: "f32" (default), "f16",
    "bf16", "q8_0" or "q4_0" (int8 / 4-bit, one fp16 scale per 32 values). cache_rotate: turn each
    head by a Hadamard rotation before storing (None: only when a type is q4_0).
    """

    def __init__(self, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 seq_len: int | None = None, threads: int | None = None, cache_type_k: str = "f32",
                 cache_type_v: str = "f32", cache_rotate: bool | None = None):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        if tokenizer is not None and not os.path.exists(tokenizer):
            raise FileNotFoundError(f"no tokenizer at {tokenizer}")
        if seq_len is not None and seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if threads is not None and threads <= 0:
            raise ValueError(f"threads must be positive, got {threads}")
        self._lib = load()
        self._m = self._seq = None
        tok = ffi.NULL if tokenizer is None else os.fsencode(tokenizer)
        handle = self._lib.kvc_open(os.fsencode(path), tok)
        if handle == ffi.NULL:
            raise ValueError(last_error())
        self._m = ffi.gc(handle, self._lib.kvc_close)
        types = [self._lib.kvc_cache_type(str(t).encode()) for t in (cache_type_k, cache_type_v)]
        if min(types) < 0:
            self.close()
            raise ValueError(f"unknown cache type in {cache_type_k!r}/{cache_type_v!r} (f32, f16, bf16, q8_0, q4_0)")
        rotate = -1 if cache_rotate is None else int(bool(cache_rotate))
        seq = self._lib.kvc_sequence_new(self._m, seq_len or 0, threads or 0, types[0], types[1], rotate)
        if seq == ffi.NULL:
            self.close()
            raise ValueError(last_error())
        self._seq = ffi.gc(seq, self._lib.kvc_sequence_free)
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        self.cache_rotate = bool(self._lib.kvc_cache_rotates(self._seq))
        c = self._lib.kvc_config(self._m)
        self.config = Config(
            dim=c.dim, hidden_dim=c.hidden_dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
            vocab_size=c.vocab_size, seq_len=self._lib.kvc_context(self._seq), head_dim=c.head_dim,
            rope_theta=c.rope_theta, norm_eps=c.norm_eps, shared_classifier=bool(c.shared_classifier),
            weight_type=c.weight_type, group_size=c.group_size, bos_id=c.bos_id, eos_id=c.eos_id,
        )
        self.has_tokenizer = bool(self._lib.kvc_has_tokenizer(self._m))
        self.end_of_turn = self._lib.kvc_end_of_turn(self._m)
        self.stats = GenerationStats()
        self._history: list[int] = []  # tokens whose K/V are in the cache, positions 0..

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and its cache now; later calls raise ValueError."""
        if self._seq is not None:  # the sequence goes first: it was made for this model
            seq, self._seq = self._seq, None
            ffi.gc(seq, None)  # detaches the finalizer, so kvc_sequence_free runs once
            self._lib.kvc_sequence_free(seq)
        if self._m is not None:
            m, self._m = self._m, None
            ffi.gc(m, None)
            self._lib.kvc_close(m)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self):
        if self._m is None:
            raise ValueError("the model is closed")
        return self._m

    def _sequence(self):
        if self._seq is None:
            raise ValueError("the model is closed")
        return self._seq

    # -- the forward pass -----------------------------------------------------------------------

    def _check_tokens(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        if pos < 0 or pos + arr.size > self.config.seq_len:
            raise IndexError(f"positions {pos}..{pos + arr.size - 1} are outside the context of {self.config.seq_len}")
        return arr.astype(np.int32)

    def _run(self, tokens: np.ndarray, pos: int, logits) -> None:
        """Run checked tokens at pos.. and keep the record of what the cache holds (for chat reuse)."""
        m, seq = self._handle(), self._sequence()
        ptr = ffi.cast("const int *", ffi.from_buffer(tokens))
        if tokens.size and self._lib.kvc_forward(m, seq, ptr, len(tokens), pos, logits) != 0:
            raise ValueError(last_error())
        if pos > len(self._history):  # a gap: the cache now holds positions the record does not know
            self._history = []
        else:
            del self._history[pos:]
            self._history.extend(tokens.tolist())

    def forward(self, tokens: Sequence[int], pos: int = 0) -> np.ndarray:
        """Run tokens at positions pos, pos+1, ... using and filling the KV cache.

        Returns float32 logits of every position, shape (len(tokens), vocab_size).
        """
        arr = self._check_tokens(tokens, pos)
        out = np.empty((arr.size, self.config.vocab_size), dtype=np.float32)
        self._run(arr, pos, ffi.cast("float *", ffi.from_buffer(out)))
        return out

    def _prefill(self, tokens: Sequence[int], pos: int) -> None:
        """Like forward, but only the last position's logits are computed (into the C state)."""
        self._run(self._check_tokens(tokens, pos), pos, ffi.NULL)

    def prefill(self, tokens: Sequence[int], pos: int = 0) -> np.ndarray:
        """Run tokens at positions pos.. filling the KV cache, computing only the last position's logits.

        Cheaper than forward() for prompts (the classifier runs once). Returns a float32 copy of those
        logits, shape (vocab_size,).
        """
        self._prefill(tokens, pos)
        logits = self._lib.kvc_logits(self._sequence())
        return np.frombuffer(ffi.buffer(logits, 4 * self.config.vocab_size), dtype=np.float32).copy()

    def reset(self, fill: float = 0.0) -> None:
        """Forget the cached tokens: the next call starts from an empty cache.

        Every cache slot is set to `fill`: 0 by default; NaN makes any read of a position that was
        never written show up as NaN logits (what the tests use to catch stray reads).
        """
        self._lib.kvc_cache_reset(self._sequence(), float(fill))
        self._history = []

    @property
    def kv_cache(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values): float32 copies (n_layers, seq_len, kv_dim) of the C cache, every slot.

        A copy, not a view: the cache's own storage is the engine's business (its element type and
        layout may differ from float32 rows), so writing to these arrays changes nothing.
        """
        seq, c = self._sequence(), self.config
        keys = np.empty((c.n_layers, c.seq_len, c.kv_dim), dtype=np.float32)
        values = np.empty_like(keys)
        for layer in range(c.n_layers):
            k = ffi.cast("float *", ffi.from_buffer(keys[layer]))
            v = ffi.cast("float *", ffi.from_buffer(values[layer]))
            if self._lib.kvc_cache_read(seq, layer, 0, c.seq_len, k, v) != 0:
                raise ValueError(last_error())
        return keys, values

    # -- text -----------------------------------------------------------------------------------

    def _need_tokenizer(self) -> None:
        if not self.has_tokenizer:
            raise ValueError("this model has no tokenizer (pass tokenizer= for llama2.c checkpoints)")

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text; with bos, a leading BOS when the model's tokenizer adds one.

        special=False (the default) treats all of text as text: a spelled-out control token such as
        "<|im_end|>" is encoded as its characters. special=True turns such spellings into their token
        ids, as Hugging Face's encode does: for raw prompts you wrote yourself, never for user input.
        """
        self._need_tokenizer()
        data = text.encode("utf-8")
        if b"\0" in data:
            raise ValueError("text contains a NUL character")
        cap = self._lib.kvc_encode_capacity(len(data))
        out = ffi.new("int[]", cap)
        n = self._lib.kvc_encode(self._handle(), data, int(bos), int(special), out, cap)
        if n < 0:
            raise ValueError(last_error())
        return list(out[0:n])

    def _token_bytes(self, prev: int, token: int) -> bytes:
        ptr = ffi.new("const char **")
        n = self._lib.kvc_token_text(self._handle(), prev, token, ptr)
        if n < 0:
            raise ValueError(last_error())
        return ffi.buffer(ptr[0], n)[:]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 becomes U+FFFD)."""
        self._need_tokenizer()
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        ids32 = arr.astype(np.int32)  # stays referenced while C reads it
        ids_ptr = ffi.cast("const int *", ffi.from_buffer(ids32))
        cap = 16 * arr.size + 16  # a guess; kvc_decode says how much room the text needs
        for _ in range(2):
            out = ffi.new("char[]", cap)
            n = self._lib.kvc_decode(self._handle(), ids_ptr, arr.size, out, cap)
            if n < 0:
                raise ValueError(last_error())
            if n <= cap:
                return ffi.buffer(out, n)[:].decode("utf-8", "replace")
            cap = n
        raise AssertionError("kvc_decode asked for more room twice")

    # -- generation -----------------------------------------------------------------------------

    def _stream(self, prompt: list[int], start: int, max_tokens: int, stops: set[int],
                temperature: float, top_p: float, top_k: int, seed: int | None) -> Iterator[str]:
        """Feed prompt[start:] at positions start.., then sample, yielding text as it completes."""
        c = self.config
        if not prompt:
            raise ValueError("nothing to start from: the prompt has no tokens")
        if len(prompt) >= c.seq_len:
            raise ValueError(f"the prompt is {len(prompt)} tokens but the context holds {c.seq_len}")
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if seed is None:
            seed = random.getrandbits(63) | 1
        sampler = self._lib.kvc_sampler_new(c.vocab_size, float(temperature), float(top_p), int(top_k), int(seed))
        if sampler == ffi.NULL:
            raise ValueError(last_error())
        sampler = ffi.gc(sampler, self._lib.kvc_sampler_free)
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt) - start, cached_tokens=start)
        t0 = time.perf_counter()
        self._prefill(prompt[start:], start)
        stats.prefill_seconds = time.perf_counter() - t0
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pos, prev = len(prompt), prompt[-1]
        t0 = time.perf_counter()
        stats.stop_reason = "length"
        for i in range(max_tokens):
            token = self._lib.kvc_sample(sampler, self._lib.kvc_logits(self._sequence()))
            if token < 0:
                raise ValueError(last_error())
            if token in stops:
                stats.stop_reason = "stop"
                break
            stats.generated_tokens += 1
            text = decoder.decode(self._token_bytes(prev, token))
            prev = token
            if text:
                yield text
            if i + 1 == max_tokens:
                break
            if pos >= c.seq_len:  # the last position's logits were used: no room to feed this token
                stats.stop_reason = "context"
                break
            self._prefill([token], pos)
            pos += 1
        tail = decoder.decode(b"", final=True)
        stats.decode_seconds = time.perf_counter() - t0
        if tail:
            yield tail

    def generate(self, prompt: str, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 0.9,
                 top_k: int = 0, seed: int | None = None) -> Iterator[str]:
        """Continue prompt, yielding text pieces as they are sampled; stops at EOS or max_tokens.

        temperature 0 is greedy; top_p 1 and top_k 0 turn those filters off; a seed makes it repeatable.
        Starts from an empty cache (positions 0..).
        """
        ids = self.encode(prompt, bos=True)
        stops = {self.config.eos_id} - {-1}
        return self._stream(ids, 0, max_tokens, stops, temperature, top_p, top_k, seed)

    def _messages(self, messages: Sequence[dict]) -> tuple:
        """Messages as C string arrays (and the buffers that keep them alive)."""
        self._need_tokenizer()
        if self._lib.kvc_chat_style(self._handle()) == 0:
            raise ValueError("this model has no chat template")
        roles, contents, keep = [], [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
                raise ValueError(f"message {i} must be a dict with string 'role' and 'content'")
            for key, arr in (("role", roles), ("content", contents)):
                data = msg[key].encode("utf-8")
                if b"\0" in data:
                    raise ValueError(f"message {i} contains a NUL character")
                keep.append(ffi.new("char[]", data))
                arr.append(keep[-1])
        return ffi.new("const char *[]", roles), ffi.new("const char *[]", contents), len(roles), keep

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """A conversation rendered with the model's chat template, special tokens spelled out."""
        roles, contents, n, _keep = self._messages(messages)
        text = ffi.new("char **")
        length = self._lib.kvc_chat_render(self._handle(), roles, contents, n, int(add_generation_prompt), text)
        if length < 0:
            raise ValueError(last_error())
        try:
            return ffi.buffer(text[0], length)[:].decode("utf-8", "replace")
        finally:
            self._lib.kvc_free(text[0])

    def chat_tokens(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        roles, contents, n, _keep = self._messages(messages)
        ids = ffi.new("int **")
        count = self._lib.kvc_chat_encode(self._handle(), roles, contents, n, 1, int(add_generation_prompt), ids)
        if count < 0:
            raise ValueError(last_error())
        try:
            return list(ids[0][0:count])
        finally:
            self._lib.kvc_free(ids[0])

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 1.0, top_p: float = 0.9,
             top_k: int = 0, seed: int | None = None) -> Iterator[str]:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]), yielding text pieces.

        The KV cache is reused for the longest prefix this conversation shares with what the cache
        holds (e.g. the earlier turns of the same chat), so only new tokens are processed.
        """
        ids = self.chat_tokens(messages, add_generation_prompt=True)
        common = 0
        limit = min(len(ids) - 1, len(self._history))  # at least one token runs, for fresh logits
        while common < limit and self._history[common] == ids[common]:
            common += 1
        stops = {self.end_of_turn, self.config.eos_id} - {-1}
        return self._stream(ids, common, max_tokens, stops, temperature, top_p, top_k, seed)
