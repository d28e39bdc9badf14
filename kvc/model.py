"""kvc.Model: the C engine driven from Python — tokens in, numpy logits out, streaming text."""
from __future__ import annotations

import array
import codecs
import operator
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ._lib import ffi, last_error, load, sequence_ints
from .checks import C_INT_MAX, float_arg, int_arg, token_ids
from .format import Config
from .pool import Pool, window_args
from .sampler import Sampler


@dataclass
class GenerationStats:
    """What the last generate()/chat() call did: tokens processed, reused and produced, and timings."""

    prompt_tokens: int = 0  # tokens run through the model before the first sampled one
    cached_tokens: int = 0  # prompt tokens whose K/V were already in the cache (chat turns)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "stop" (end token), "length" (max_tokens) or "context" (cache full)


class _CacheView:
    """A read-only numpy array interface over a sequence's cache memory; holding the sequence (whose
    finalizer frees that memory) for as long as any array made from it lives."""

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: np.dtype, owner: object):
        self.__array_interface__ = {"shape": shape, "strides": strides, "typestr": dtype.str, "data": (address, True),
                                    "version": 3}
        self._owner = owner


class Model:
    """A checkpoint loaded by the C engine, with one sequence: its KV cache and run state.

    path: a kvc `.bin` (or a llama2.c checkpoint, with `tokenizer` naming its tokenizer.bin).
    seq_len: a context shorter than the model's (1..the model's seq_len), to shrink the KV cache.
    threads: OpenMP threads of the forward pass (1..512; default: every core, at most 512).
    config.seq_len is this sequence's context.
    cache_type_k, cache_type_v: how the KV cache stores keys and values: "f32" (default), "f16",
    "bf16", "q8_0", "q4_0" or "iq4_nl" (int8 / 4-bit, one fp16 scale per 32 values; iq4_nl: 16
    non-uniform levels, keys less the file's key_mean, position 0 as q8_0). cache_rotate: turn each
    head by a Hadamard rotation before storing (None: only when a type is 4-bit).
    window: keep only the last `window` positions (a multiple of 16) and the first `sinks` (attention
    sinks; default 4), and run on past the model's context for as long as tokens come: forward
    appends at pos == the tokens fed so far (or starts again at 0), and RoPE turns each position by
    its place inside the cache (StreamingLLM). config.seq_len is then the cache's rows.
    h2o: keep at most `h2o` positions: the last `recent` (default h2o // 2) and those that drew the
    most attention so far (H2O; README says exactly how); forward appends at the end (or starts
    again at 0), up to the model's context (config.seq_len).
    device: where the forward pass runs: "cpu" (libkvc.so), "cuda" (libkvc_cuda.so, `make cuda`) or
    "cuda-sim" (libkvc_cuda_sim.so, `make cuda-sim`: the CUDA kernels run on the CPU). On a device,
    threads is unused and kv_cache_view() is refused (the cache is in device memory; kv_cache copies it).

    Threads: a Model can be shared. Every call that touches the C model or cache holds the Model's
    lock, so calls on one Model run one at a time and each sees the cache as the previous one left
    it; different Models run in parallel (the C calls release the GIL). Generators hold the lock
    for each step only, never while their caller has a piece of text: a generator whose Model's
    cache was changed since its last step (by forward, prefill, reset or another generator) raises
    RuntimeError on its next step instead of continuing from the wrong cache.
    """

    def __init__(self, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 seq_len: int | None = None, threads: int | None = None, cache_type_k: str = "f32",
                 cache_type_v: str = "f32", cache_rotate: bool | None = None, window: int | None = None,
                 sinks: int | None = None, h2o: int | None = None, recent: int | None = None, device: str = "cpu"):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        if tokenizer is not None and not os.path.exists(tokenizer):
            raise FileNotFoundError(f"no tokenizer at {tokenizer}")
        # 0 asks C for the defaults, so Python refuses it; the C library checks the upper bounds
        context = 0 if seq_len is None else int_arg("seq_len", seq_len, 1, C_INT_MAX)
        n_threads = 0 if threads is None else int_arg("threads", threads, 1, C_INT_MAX)
        self.window, self.sinks = window_args(window, sinks)
        if self.window is not None and seq_len is not None:
            raise ValueError("a windowed Model's cache holds its sinks and window: give window=, not seq_len=")
        if recent is not None and h2o is None:
            raise ValueError("recent= is H2O's: give h2o= too")
        self.h2o = None if h2o is None else int_arg("h2o", h2o, 2, C_INT_MAX)
        self.recent = None if h2o is None else int_arg("recent", self.h2o // 2 if recent is None else recent, 0, C_INT_MAX)
        if self.h2o is not None and (window is not None or seq_len is not None):
            raise ValueError("H2O's cache holds its budget: give h2o=, not window= or seq_len=")
        if not isinstance(device, str):
            raise TypeError(f"device must be a string, got {type(device).__name__}")
        if (self.window is not None or self.h2o is not None) and device != "cpu":
            raise ValueError(f"a window or H2O runs on the CPU only, not on {device!r}")
        self._lib = load(device)
        self.device = device
        self._lock = threading.Lock()  # held by every call that touches self._m or self._seq
        self._version = 0  # bumped by every change to the cache: generators compare it between steps
        self._m = self._seq = None
        tok = ffi.NULL if tokenizer is None else os.fsencode(tokenizer)
        handle = self._lib.kvc_open(os.fsencode(path), tok)
        if handle == ffi.NULL:
            raise ValueError(last_error(self._lib))
        self._m = ffi.gc(handle, self._lib.kvc_close)
        try:
            types = [self._cache_type(t) for t in (cache_type_k, cache_type_v)]
        except ValueError:
            self.close()
            raise
        rotate = -1 if cache_rotate is None else int(bool(cache_rotate))
        if self.window is not None:
            seq = self._lib.kvc_sequence_new_window(self._m, self.window, self.sinks, n_threads, types[0], types[1], rotate)
        elif self.h2o is not None:
            seq = self._lib.kvc_sequence_new_h2o(self._m, self.h2o, self.recent, n_threads, types[0], types[1], rotate)
        else:
            seq = self._lib.kvc_sequence_new_on(self._m, device.encode(), context, n_threads, types[0], types[1], rotate)
        if seq == ffi.NULL:
            self.close()
            raise ValueError(last_error(self._lib))
        self._seq = ffi.gc(seq, self._lib.kvc_sequence_free)
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        self.cache_rotate = bool(self._lib.kvc_cache_rotates(self._seq))
        c = self._lib.kvc_config(self._m)
        self.config = Config(
            dim=c.dim, hidden_dim=c.hidden_dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
            vocab_size=c.vocab_size, seq_len=c.seq_len if self.h2o else self._lib.kvc_context(self._seq), head_dim=c.head_dim,
            rope_theta=c.rope_theta, norm_eps=c.norm_eps, shared_classifier=bool(c.shared_classifier),
            bos_id=c.bos_id, eos_id=c.eos_id,
        )
        self.has_tokenizer = bool(self._lib.kvc_has_tokenizer(self._m))
        self.end_of_turn = self._lib.kvc_end_of_turn(self._m)
        self._chat_style = self._lib.kvc_chat_style(self._m)
        self.stats = GenerationStats()  # of the generate()/chat() started last
        # tokens whose K/V are in the cache, positions 0.. (4 bytes each: a window runs on for as long as it goes)
        self._history = array.array("i")

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and its cache now (after a call in progress in another thread returns).

        Every later call, and the next step of a generator, raises ValueError("the model is closed").
        """
        with self._lock:
            # the sequence's finalizer (kvc_sequence_free) runs when the last reference goes: now, or
            # when the last kv_cache_view() array that still reads its cache is gone
            self._seq = None
            if self._m is not None:
                m, self._m = self._m, None
                ffi.gc(m, None)
                self._lib.kvc_close(m)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> tuple:
        """The C model and sequence; raises ValueError once closed. Call it with self._lock held:
        the handles stay valid only while the lock keeps close() out."""
        if self._m is None:
            raise ValueError("the model is closed")
        return self._m, self._seq

    # -- the forward pass -----------------------------------------------------------------------
    # cffi releases the GIL around every call of a C function, in ABI mode too (its docs: "C function
    # calls are done with the GIL released"). Measured: while one thread spent 0.14 s in kvc_forward, a
    # pure-Python thread counted at full speed (30 M/s, as when the caller sleeps; 0.56 M/s during a
    # re.match, which holds the GIL). So Models run in parallel in threads, and without self._lock two
    # threads would run in one sequence's cache and scratch at once.

    def _check_tokens(self, tokens: Sequence[int], pos: int) -> tuple[np.ndarray, int]:
        arr = token_ids(tokens, self.config.vocab_size)
        try:
            pos = operator.index(pos)
        except TypeError:
            raise TypeError(f"pos must be an integer, got {type(pos).__name__}") from None
        if self.window is not None:  # runs on from its end: C checks pos is that end or 0
            if pos < 0:
                raise IndexError(f"position {pos} is negative")
        elif pos < 0 or pos + arr.size > self.config.seq_len:
            raise IndexError(f"positions {pos}..{pos + arr.size - 1} are outside the context of {self.config.seq_len}")
        return arr, pos

    def _run(self, seq, tokens: np.ndarray, pos: int, logits) -> None:
        """Run checked tokens (int32) at pos.. and keep the record of what the cache holds (for chat reuse).

        The caller holds self._lock and got seq from _open()."""
        self._version += 1
        ptr = ffi.cast("const int *", ffi.from_buffer(tokens))
        if tokens.size and self._lib.kvc_forward(self._m, seq, ptr, len(tokens), pos, logits) != 0:
            self._history = array.array("i")  # the cache may hold part of the tokens
            raise ValueError(last_error(self._lib))
        if pos > len(self._history):  # a gap: the cache now holds positions the record does not know
            self._history = array.array("i")
        else:
            del self._history[pos:]
            self._history.frombytes(tokens.tobytes())

    def forward(self, tokens: Sequence[int], pos: int = 0) -> np.ndarray:
        """Run tokens at positions pos, pos+1, ... using and filling the KV cache.

        tokens: integer ids in [0, vocab_size) (ValueError otherwise; TypeError for non-integers).
        pos: positions pos..pos+len(tokens)-1 must lie in [0, config.seq_len) (IndexError otherwise).
        Returns float32 logits of every position, shape (len(tokens), vocab_size).
        """
        arr, pos = self._check_tokens(tokens, pos)
        out = np.empty((arr.size, self.config.vocab_size), dtype=np.float32)
        with self._lock:
            _, seq = self._open()
            self._run(seq, arr, pos, ffi.cast("float *", ffi.from_buffer(out)))
        return out

    def prefill(self, tokens: Sequence[int], pos: int = 0) -> np.ndarray:
        """Run tokens at positions pos.. filling the KV cache, computing only the last position's logits.

        Cheaper than forward() for prompts (the classifier runs once); tokens and pos as in forward().
        Returns a float32 copy of those logits, shape (vocab_size,).
        """
        arr, pos = self._check_tokens(tokens, pos)
        with self._lock:
            _, seq = self._open()
            self._run(seq, arr, pos, ffi.NULL)
            logits = self._lib.kvc_logits(seq)
            return np.frombuffer(ffi.buffer(logits, 4 * self.config.vocab_size), dtype=np.float32).copy()

    def reset(self, fill: float = 0.0) -> None:
        """Forget the cached tokens: the next call starts from an empty cache.

        Every cache slot is set to `fill`, a real number: 0 by default; NaN makes any read of a position
        that was never written show up as NaN logits (what the tests use to catch stray reads). NaN and
        the infinities are allowed; finite values beyond float32's range raise ValueError.
        """
        value = float_arg("fill", fill)
        with self._lock:
            _, seq = self._open()
            self._version += 1
            self._lib.kvc_cache_reset(seq, value)
            self._history = array.array("i")

    def pool(self, *, blocks: int | None = None, memory: int | None = None, block_size: int = 16,
             threads: int | None = None, cache_type_k: str | None = None, cache_type_v: str | None = None,
             cache_rotate: bool | None = None) -> Pool:
        """A paged KV cache on this model's weights for many sequences at once (see kvc.Pool).

        blocks: KV blocks in the pool, or memory: bytes of KV cache to fill with blocks (neither: enough
        for one sequence of the checkpoint's whole context). block_size: positions per block. threads as
        for Model. Cache types and rotation default to this Model's. Close the pool before the Model.
        """
        if self.device != "cpu":
            raise ValueError(f"a pool runs on the CPU only, not on {self.device!r}")
        types = [self._cache_type(t) for t in (cache_type_k or self.cache_type_k, cache_type_v or self.cache_type_v)]
        with self._lock:
            m, _ = self._open()
            max_seq_len = self._lib.kvc_config(m).seq_len
            return Pool(self._lib, m, blocks=blocks, memory=memory, block_size=block_size, threads=threads,
                        cache_types=(types[0], types[1]), cache_rotate=cache_rotate, vocab_size=self.config.vocab_size,
                        max_seq_len=max_seq_len)

    def _cache_type(self, name: str) -> int:
        """The C number of cache type `name`; ValueError for an unknown one."""
        number = self._lib.kvc_cache_type(str(name).encode())
        if number < 0:
            raise ValueError(f"unknown cache type {name!r} (f32, f16, bf16, q8_0, q4_0, iq4_nl)")
        return number

    def save_state(self, path: str | os.PathLike) -> None:
        """Save the cache (the rows that hold tokens, in their stored types), its tokens and the
        window's state to `path`, atomically (a temporary file renamed over it: a crash leaves any old
        file whole). The format is in README ("Sessions")."""
        with self._lock:
            m, seq = self._open()
            if self._lib.kvc_session_save(m, seq, ffi.NULL, os.fsencode(path)) != 0:
                raise ValueError(last_error(self._lib))

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore what save_state wrote, into this Model's cache: it then continues exactly as the
        saved one would. A file from another model, cache type, rotation or window, a truncated or
        corrupted one, or one from a newer format raises ValueError (FileNotFoundError when there
        is none); after a refusal, reset() before using the cache again."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no session at {path}")
        with self._lock:
            m, seq = self._open()
            self._version += 1
            self._history = array.array("i")
            if self._lib.kvc_session_load(m, seq, ffi.NULL, os.fsencode(path)) != 0:
                raise ValueError(last_error(self._lib))
            tokens = sequence_ints(self._lib.kvc_tokens, seq)
            # for chat()'s reuse: the whole history when nothing was evicted (a window that moved
            # continues with forward(tokens, pos=its length) instead)
            self._history = array.array("i", tokens.tobytes() if tokens.size == self._lib.kvc_length(seq) else b"")

    def memory(self) -> dict[str, int]:
        """Bytes in use, from the engine's own accounting: weights (the mapped checkpoint, tokenizer
        included), kv_cache (as allocated, in its element types), scratch (activations) and total."""
        out = ffi.new("unsigned long long[3]")
        with self._lock:
            m, seq = self._open()
            self._lib.kvc_memory(m, seq, out)
        sizes = {"weights": int(out[0]), "kv_cache": int(out[1]), "scratch": int(out[2])}
        sizes["total"] = sum(sizes.values())
        return sizes

    def thread_use(self) -> dict[str, int]:
        """How the forward pass uses its threads: threads (as asked for), team (what the next forward
        block runs on: fewer while another process keeps a core busy, then threads again once the core
        is free), blocks (forward blocks run so far) and reduced_blocks (how many of them ran on fewer).
        Results do not depend on the team: only speed does."""
        out = ffi.new("long long[4]")
        with self._lock:
            _, seq = self._open()
            self._lib.kvc_threads(seq, out)
        return {"threads": int(out[0]), "team": int(out[1]), "blocks": int(out[2]), "reduced_blocks": int(out[3])}

    @property
    def kv_cache(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values): float32 copies (n_layers, seq_len, kv_dim) of the C cache, every slot.

        A copy, dequantized and rotated back, for every cache type: writing to these arrays changes
        nothing. iq4_nl keys come back as stored, less the file's key_mean (attention reads them so:
        the mean moves every score of a query alike, which softmax ignores). kv_cache_view() gives the cache's own memory without a copy where numpy has its type.
        With a window or H2O, the rows that hold tokens (n_layers, rows, kv_dim), in the cache's order
        (a window: its sinks' block, padded after the sinks, then the window's positions; H2O: no order).
        """
        c = self.config
        with self._lock:
            _, seq = self._open()
            rows = c.seq_len if self.window is None and self.h2o is None else self._lib.kvc_tokens(seq, ffi.NULL, 0)
            keys = np.empty((c.n_layers, rows, c.kv_dim), dtype=np.float32)
            values = np.empty_like(keys)
            for layer in range(c.n_layers):
                k = ffi.cast("float *", ffi.from_buffer(keys[layer]))
                v = ffi.cast("float *", ffi.from_buffer(values[layer]))
                if self._lib.kvc_cache_read(seq, layer, 0, rows, k, v) != 0:
                    raise ValueError(last_error(self._lib))
        return keys, values

    def kv_cache_view(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values): read-only numpy views (n_layers, seq_len, n_kv_heads, head_dim) of the C
        cache itself, no copy, for caches stored as f32 or f16 without rotation (float32 / float16
        arrays). The C cache is head-major, (n_layers, n_kv_heads, seq_len, head_dim): the views are
        strided over it. They follow every later forward and reset, and keep the cache's memory alive
        after close(). Other cache types raise ValueError: use kv_cache, the float32 copy every type gives.
        """
        c = self.config
        with self._lock:
            _, seq = self._open()
            views = []
            for which, name in ((0, self.cache_type_k), (1, self.cache_type_v)):
                data = self._lib.kvc_cache_data(seq, which)
                if data == ffi.NULL:
                    raise ValueError(f"no view of a {name} cache{' that rotates' if self.cache_rotate else ''}: "
                                     "only unrotated f32 and f16 caches are numpy arrays (use kv_cache for a copy)")
                dtype = np.dtype(np.float32 if name == "f32" else np.float16)
                shape = (c.n_layers, c.seq_len, c.n_kv_heads, c.head_dim)
                e = dtype.itemsize  # strides of the head-major (layer, head, pos, value) memory, in that shape's order
                strides = (c.n_kv_heads * c.seq_len * c.head_dim * e, c.head_dim * e, c.seq_len * c.head_dim * e, e)
                views.append(np.asarray(_CacheView(int(ffi.cast("uintptr_t", data)), shape, strides, dtype, seq)))
        return views[0], views[1]

    # -- text -----------------------------------------------------------------------------------

    def _need_tokenizer(self) -> None:
        if self._m is None:  # a first check, for the error's sake; calls check again under the lock
            raise ValueError("the model is closed")
        if not self.has_tokenizer:
            raise ValueError("this model has no tokenizer (pass tokenizer= for llama2.c checkpoints)")

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text; with bos, a leading BOS when the model's tokenizer adds one.

        special=False (the default) treats all of text as text: a spelled-out control token such as
        "<|im_end|>" is encoded as its characters. special=True turns such spellings into their token
        ids, as Hugging Face's encode does: for raw prompts you wrote yourself, never for user input.
        text must be a str without NUL characters, under 2**31 bytes of UTF-8.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self._need_tokenizer()
        data = text.encode("utf-8")
        if b"\0" in data:
            raise ValueError("text contains a NUL character")
        cap = self._lib.kvc_encode_capacity(len(data)) if len(data) <= C_INT_MAX else -1
        if cap < len(data):  # the room the ids need does not fit an int
            raise ValueError(f"the text is too long to encode: {len(data)} bytes")
        out = ffi.new("int[]", cap)
        with self._lock:
            m, _ = self._open()
            n = self._lib.kvc_encode(m, data, int(bool(bos)), int(bool(special)), out, cap)
            if n < 0:
                raise ValueError(last_error(self._lib))
        return list(out[0:n])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, integers in [0, vocab_size) (invalid UTF-8 becomes U+FFFD)."""
        self._need_tokenizer()
        ids32 = token_ids(ids, self.config.vocab_size)  # stays referenced while C reads it
        if ids32.size > C_INT_MAX:
            raise ValueError(f"at most {C_INT_MAX} ids can be decoded at once, got {ids32.size}")
        ids_ptr = ffi.cast("const int *", ffi.from_buffer(ids32))
        cap = min(16 * ids32.size + 16, C_INT_MAX)  # a guess; kvc_decode says how much room the text needs
        with self._lock:
            m, _ = self._open()
            for _ in range(2):
                out = ffi.new("char[]", cap)
                n = self._lib.kvc_decode(m, ids_ptr, ids32.size, out, cap)
                if n < 0:
                    raise ValueError(last_error(self._lib))
                if n <= cap:
                    return ffi.buffer(out, n)[:].decode("utf-8", "replace")
                cap = n
        raise AssertionError("kvc_decode asked for more room twice")

    def _token_text(self, m, prev: int, token: int) -> bytes:
        """The bytes token decodes to after prev. The caller holds self._lock and got m from _open()."""
        ptr = ffi.new("const char **")
        n = self._lib.kvc_token_text(m, prev, token, ptr)
        if n < 0:
            raise ValueError(last_error(self._lib))
        return ffi.buffer(ptr[0], n)[:]

    def token_bytes(self, prev: int, token: int) -> bytes:
        """The bytes token decodes to after prev (-1 at the start of a text): what a stream of sampled
        tokens prints, piece by piece (a UTF-8 character may span tokens)."""
        with self._lock:
            m, _ = self._open()
            return self._token_text(m, prev, token)

    # -- generation -----------------------------------------------------------------------------

    def _generation(self, prompt: list[int], reuse_cache: bool, stops: set[int], max_tokens: int,
                    temperature: float, top_p: float, top_k: int, seed: int | None,
                    use_cache: bool = True) -> Iterator[str]:
        """Checks the arguments now (not at the generator's first step) and returns the generator."""
        c = self.config
        max_tokens = int_arg("max_tokens", max_tokens, 0)
        sampler = Sampler(c.vocab_size, temperature, top_p, top_k, seed)
        if not prompt:
            raise ValueError("nothing to start from: the prompt has no tokens")
        if self.window is None and len(prompt) >= c.seq_len:
            raise ValueError(f"the prompt is {len(prompt)} tokens but the context holds {c.seq_len}")
        return self._stream(prompt, reuse_cache, stops, max_tokens, sampler, use_cache)

    def _feed_prompt(self, seq, prompt: list[int], reuse_cache: bool) -> GenerationStats:
        """Run the prompt (with reuse_cache, from the longest prefix the cache holds) and start the
        stats of a generation. The caller holds self._lock."""
        start = 0
        if reuse_cache:  # at least one token runs, for fresh logits
            limit = min(len(prompt) - 1, len(self._history))
            while start < limit and self._history[start] == prompt[start]:
                start += 1
            if (self.window or self.h2o) and start < len(self._history):  # these run on from their end only
                start = 0
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt) - start, cached_tokens=start)
        t0 = time.perf_counter()
        self._run(seq, np.array(prompt[start:], dtype=np.int32), start, ffi.NULL)
        stats.prefill_seconds = time.perf_counter() - t0
        stats.stop_reason = "length"
        return stats

    def _stream(self, prompt: list[int], reuse_cache: bool, stops: set[int], max_tokens: int,
                sampler, use_cache: bool) -> Iterator[str]:
        """Feed the prompt, then sample, yielding text as it completes. Each step holds the lock: it
        feeds the prompt (the first step) or the token the last step sampled, then samples the next.
        Between steps another call may change the cache, which the next step notices (self._version
        moved) and refuses to continue from. Without use_cache, each step recomputes every token so
        far from position 0 instead of feeding one."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pos, prev, token, version = len(prompt), prompt[-1], 0, 0
        sequence = list(prompt)  # every token so far, for use_cache=False
        for i in range(max(max_tokens, 1)):  # max_tokens 0: the prompt alone is fed
            with self._lock:
                m, seq = self._open()
                if i == 0:
                    stats = self._feed_prompt(seq, prompt, reuse_cache)
                    t0 = time.perf_counter()
                elif self._version != version:
                    raise RuntimeError("the model's cache changed since this generator's last step (another "
                                       "generate, chat, forward, prefill or reset ran on this Model): "
                                       "start a new generator")
                elif use_cache:
                    self._run(seq, np.array([token], dtype=np.int32), pos, ffi.NULL)
                    pos += 1
                else:
                    sequence.append(token)
                    self._run(seq, np.array(sequence, dtype=np.int32), 0, ffi.NULL)
                    pos += 1
                version = self._version
                if max_tokens == 0:
                    break
                token = sampler.sample_into(self._lib.kvc_logits(seq))
                if token in stops:
                    stats.stop_reason = "stop"
                    break
                data = self._token_text(m, prev, token)
            stats.generated_tokens += 1
            text = decoder.decode(data)
            prev = token
            if text:
                yield text
            if i + 1 == max_tokens:
                break
            if self.window is None and pos >= self.config.seq_len:  # the last position's logits were used: no room to feed this token
                stats.stop_reason = "context"
                break
        tail = decoder.decode(b"", final=True)
        stats.decode_seconds = time.perf_counter() - t0
        if tail:
            yield tail

    def generate(self, prompt: str, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 0.9,
                 top_k: int = 0, seed: int | None = None, use_cache: bool = True) -> Iterator[str]:
        """Continue prompt, yielding text pieces as they are sampled; stops at EOS or max_tokens.

        max_tokens: >= 0. temperature: >= 0 and finite, 0 is greedy. top_p: in [0, 1], 1 turns it off.
        top_k: 0..2**31-1, 0 turns it off. seed: 0..2**64-1 makes it repeatable (None: a random one).
        Arguments out of range raise ValueError here, not at the first step. Starts from an empty cache
        (positions 0..) when first iterated; raises RuntimeError if the cache changes between steps.
        use_cache=False recomputes the whole sequence for every new token, as a transformer without a
        KV cache does (same output, quadratic cost): what the cache saves, measured.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = self.encode(prompt, bos=True)
        stops = {self.config.eos_id} - {-1}
        return self._generation(ids, False, stops, max_tokens, temperature, top_p, top_k, seed, bool(use_cache))

    def _messages(self, messages: Sequence[dict]) -> tuple:
        """Messages as C string arrays (and the buffers that keep them alive)."""
        self._need_tokenizer()
        if self._chat_style == 0:
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
        with self._lock:
            m, _ = self._open()
            length = self._lib.kvc_chat_render(m, roles, contents, n, int(bool(add_generation_prompt)), text)
        if length < 0:
            raise ValueError(last_error(self._lib))
        try:
            return ffi.buffer(text[0], length)[:].decode("utf-8", "replace")
        finally:
            self._lib.kvc_free(text[0])

    def chat_tokens(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        roles, contents, n, _keep = self._messages(messages)
        ids = ffi.new("int **")
        with self._lock:
            m, _ = self._open()
            count = self._lib.kvc_chat_encode(m, roles, contents, n, 1, int(bool(add_generation_prompt)), ids)
        if count < 0:
            raise ValueError(last_error(self._lib))
        try:
            return list(ids[0][0:count])
        finally:
            self._lib.kvc_free(ids[0])

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 1.0, top_p: float = 0.9,
             top_k: int = 0, seed: int | None = None) -> Iterator[str]:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]), yielding text pieces.

        The KV cache is reused for the longest prefix this conversation shares with what the cache
        holds when the generator starts (e.g. the earlier turns of the same chat), so only new tokens
        are processed. Sampling arguments, their ranges and the rule on a changed cache as in generate().
        """
        ids = self.chat_tokens(messages, add_generation_prompt=True)
        stops = {self.end_of_turn, self.config.eos_id} - {-1}
        return self._generation(ids, True, stops, max_tokens, temperature, top_p, top_k, seed)
