"""kvc.Pool: many sequences sharing one paged KV cache, run together a step at a time.

A pool is a fixed number of KV blocks (block_size positions of every layer's keys and values each).
A sequence holds a table of blocks, takes new ones as it grows and gives them back when freed;
forks share blocks (a write into a shared block copies it first) and full blocks are kept, named
by their tokens, so that a later sequence starting with the same tokens takes them instead of
recomputing (the prefix cache). `Pool.step` runs a batch: several sequences, each with one or more
new tokens, in one forward pass that reads every weight once per block of up to 64 tokens.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._lib import ffi, last_error, sequence_ints
from .checks import C_INT_MAX, int_arg, token_ids

OUT_OF_BLOCKS = -2  # kvc_step's return when the pool has too few blocks
DEFAULT_SINKS = 4  # first positions a window keeps unless told otherwise (StreamingLLM's; run.c's DEFAULT_SINKS)


def window_args(window: int | None, sinks: int | None) -> tuple[int | None, int | None]:
    """A window and its sinks as checked ints (sinks default DEFAULT_SINKS), or (None, None) without
    a window. ValueError for sinks without a window, TypeError/ValueError for bad values."""
    if sinks is not None and window is None:
        raise ValueError("sinks are kept while a window moves: give window= too")
    if window is None:
        return None, None
    return int_arg("window", window, 1, C_INT_MAX), int_arg("sinks", DEFAULT_SINKS if sinks is None else sinks, 0, C_INT_MAX)


def window_rows(window: int, sinks: int | None, block_size: int) -> int:
    """The most rows a windowed sequence's cache holds, however long it runs: its sinks (None: the
    default) rounded up to whole blocks, then the window (run.c's sink_rows + window)."""
    sinks = DEFAULT_SINKS if sinks is None else sinks
    return -(-sinks // block_size) * block_size + window


class PoolFull(RuntimeError):
    """The pool has too few free (or evictable cached) blocks for a step; nothing was changed."""


@dataclass(frozen=True)
class PoolStats:
    """The pool's blocks: total = used (held by a live sequence) + cached (held by none, keeping a
    prefix for reuse, evicted least recently used first when needed) + free. prefix_hit_tokens:
    positions sequences have taken from the prefix cache so far."""

    total: int
    used: int
    cached: int
    free: int
    prefix_hit_tokens: int


class Pool:
    """A paged KV cache for one model's weights, shared by many PoolSequences (see the module doc).

    Made by `Model.pool()`. Every method is thread-safe (one lock per pool; `step` releases the GIL
    while the forward pass runs). Close the pool before its Model.
    """

    def __init__(self, lib, model_handle, *, blocks: int | None, memory: int | None, block_size: int,
                 threads: int | None, cache_types: tuple[int, int], cache_rotate: bool | None, vocab_size: int,
                 max_seq_len: int):
        """Use Model.pool(); the arguments are the model's C handle and its checked settings."""
        self._lib = lib
        self._m = model_handle  # keeps the C model alive while the pool is
        self._lock = threading.Lock()
        self._seqs: weakref.WeakSet[PoolSequence] = weakref.WeakSet()
        self.block_size = int_arg("block_size", block_size, 1, max_seq_len)
        rotate = -1 if cache_rotate is None else int(bool(cache_rotate))
        self.block_bytes = int(lib.kvc_block_bytes(model_handle, self.block_size, cache_types[0], cache_types[1], rotate))
        if blocks is not None and memory is not None:
            raise ValueError("give blocks or memory, not both")
        if memory is not None:
            memory = int_arg("memory", memory, 1)
            blocks = memory // self.block_bytes
            if blocks < 1:
                raise ValueError(f"{memory} bytes hold no block of {self.block_bytes} bytes")
        elif blocks is None:
            blocks = -(-max_seq_len // self.block_size)  # one sequence of the full context
        self.blocks_total = int_arg("blocks", blocks, 1, C_INT_MAX // self.block_size)
        n_threads = 0 if threads is None else int_arg("threads", threads, 1, C_INT_MAX)
        handle = lib.kvc_pool_new(model_handle, self.blocks_total, self.block_size, n_threads, cache_types[0],
                                  cache_types[1], rotate)
        if handle == ffi.NULL:
            raise ValueError(last_error(self._lib))
        self._pool = handle
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free every sequence of the pool and the pool; later calls raise ValueError."""
        with self._lock:
            if self._pool is None:
                return
            for seq in list(self._seqs):
                seq._release()
            self._lib.kvc_pool_free(self._pool)
            self._pool = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self.close()

    def _open(self):
        """The C pool; the caller holds self._lock."""
        if self._pool is None:
            raise ValueError("the pool is closed")
        return self._pool

    # -- the books ------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """How the pool's blocks are used now."""
        out = ffi.new("long long[6]")
        with self._lock:
            self._lib.kvc_pool_stats(self._open(), out)
        return PoolStats(total=int(out[0]), used=int(out[1]), cached=int(out[2]), free=int(out[3]),
                         prefix_hit_tokens=int(out[4]))

    def poison(self, on: bool = True) -> None:
        """Fill blocks with NaN as they are freed (and the free ones now), so that a read of a position
        no sequence wrote shows as NaN logits: for tests."""
        with self._lock:
            self._lib.kvc_pool_poison(self._open(), int(bool(on)))

    # -- sequences ------------------------------------------------------------------------------

    def sequence(self, window: int | None = None, sinks: int | None = None) -> "PoolSequence":
        """A new, empty sequence in this pool. With a window: it keeps its first `sinks` positions
        (default 4) and its last `window` (a multiple of block_size), runs on past the model's
        context, and takes at most `room` tokens a step (kvc.Model's window= explains the policy)."""
        window, sinks = window_args(window, sinks)
        with self._lock:
            pool = self._open()
            if window is None:
                return self._adopt(self._lib.kvc_pool_sequence(pool))
            return self._adopt(self._lib.kvc_pool_sequence_window(pool, window, sinks))

    def _adopt(self, handle) -> "PoolSequence":
        """A PoolSequence for a new C sequence handle; the caller holds self._lock."""
        if handle == ffi.NULL:
            raise ValueError(last_error(self._lib))
        seq = PoolSequence(self, handle)
        self._seqs.add(seq)
        return seq

    def load_state(self, path: str | os.PathLike) -> "PoolSequence":
        """A new sequence holding what a session file holds (saved from a PoolSequence or a Model with
        this pool's cache types and block size): its full blocks join the prefix cache, so a prompt
        that starts with its tokens finds them after the sequence is freed. Raises PoolFull when the
        pool lacks the blocks, ValueError for a file that does not fit (FileNotFoundError: none)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no session at {path}")
        with self._lock:
            seq = self._adopt(self._lib.kvc_pool_sequence(self._open()))
            rc = self._lib.kvc_session_load(self._m, seq.handle(self), ffi.NULL, os.fsencode(path))
            if rc != 0:
                error = last_error(self._lib)
                seq._release()
                raise (PoolFull if rc == OUT_OF_BLOCKS else ValueError)(error)
            seq._extend(sequence_ints(self._lib.kvc_tokens, seq.handle(self)))
        return seq

    def blocks_needed(self, seq: "PoolSequence", n_tokens: int) -> int:
        """New blocks appending n_tokens to seq would take now (a copy of a shared block included)."""
        n = int_arg("n_tokens", n_tokens, 0, C_INT_MAX)
        with self._lock:
            return int(self._lib.kvc_blocks_needed(seq.handle(self), n))

    def step(self, work: Sequence[tuple["PoolSequence", Sequence[int]]]) -> np.ndarray:
        """Append tokens to several sequences in one forward pass: work is (sequence, tokens) pairs,
        each sequence at most once, each with at least one token. Returns float32 logits
        (len(work), vocab_size), row i the last token of work[i]'s. Raises PoolFull when the pool
        lacks blocks (nothing changed), ValueError for bad tokens or a sequence past the context."""
        work = list(work)
        if not work:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        arrays = [token_ids(tokens, self.vocab_size) for _, tokens in work]
        if any(a.size == 0 for a in arrays):
            raise ValueError("every sequence of a step needs at least one token")
        tokens = np.concatenate(arrays)
        counts = np.array([a.size for a in arrays], dtype=np.int32)
        logits = np.empty((len(work), self.vocab_size), dtype=np.float32)
        with self._lock:
            pool = self._open()
            handles = ffi.new("Sequence *[]", [seq.handle(self) for seq, _ in work])
            rc = self._lib.kvc_step(self._m, pool, handles, ffi.cast("const int *", ffi.from_buffer(counts)),
                                    ffi.cast("const int *", ffi.from_buffer(tokens)), len(work),
                                    ffi.cast("float *", ffi.from_buffer(logits)))
            if rc == OUT_OF_BLOCKS:
                raise PoolFull(last_error(self._lib))
            if rc != 0:
                raise ValueError(last_error(self._lib))
            for (seq, _), a in zip(work, arrays):
                seq._extend(a)
        return logits


class PoolSequence:
    """A sequence in a Pool: a block table and the tokens it holds. Made by Pool.sequence() or fork()."""

    def __init__(self, pool: Pool, handle):
        self._pool = pool
        self._handle = handle
        self._tokens: list[int] = []

    def handle(self, pool: Pool):
        """The C handle, for pool's calls (which hold pool's lock); ValueError if freed or another pool's."""
        if pool is not self._pool:
            raise ValueError("this sequence belongs to another pool")
        if self._handle is None:
            raise ValueError("the sequence was freed")
        return self._handle

    @property
    def len(self) -> int:
        """Positions it holds (0..len-1)."""
        return len(self._tokens)

    @property
    def room(self) -> int:
        """Tokens the next step can give it (a windowed sequence takes them up to its window's end)."""
        with self._pool._lock:
            return int(self._pool._lib.kvc_step_room(self.handle(self._pool)))

    @property
    def tokens(self) -> list[int]:
        """The token ids at those positions."""
        return list(self._tokens)

    @property
    def blocks(self) -> list[int]:
        """Its block table: the pool blocks holding its positions, block_size of them each, in order."""
        with self._pool._lock:
            return sequence_ints(self._pool._lib.kvc_block_table, self.handle(self._pool)).tolist()

    def _extend(self, tokens: np.ndarray) -> None:
        self._tokens.extend(tokens.tolist())

    def reuse_prefix(self, tokens: Sequence[int]) -> int:
        """On an empty sequence: take the cached blocks holding the start of `tokens` (whole blocks,
        always leaving at least one token to run). Returns the positions taken (now self.len)."""
        arr = token_ids(tokens, self._pool.vocab_size)
        with self._pool._lock:
            self._pool._open()
            n = self._lib_call("kvc_reuse_prefix", ffi.cast("const int *", ffi.from_buffer(arr)), arr.size)
            self._tokens = arr[:n].tolist()
        return n

    def fork(self) -> "PoolSequence":
        """A new sequence holding the same tokens, sharing every block (copied on the next write)."""
        with self._pool._lock:
            self._pool._open()
            child = self._pool._adopt(self._pool._lib.kvc_fork(self.handle(self._pool)))
            child._tokens = list(self._tokens)
        return child

    def truncate(self, n: int) -> None:
        """Keep positions 0..n-1 (n <= len); the blocks after them go back to the pool."""
        n = int_arg("n", n, 0, self.len)
        with self._pool._lock:
            self._pool._open()
            self._lib_call("kvc_truncate", n)
            del self._tokens[n:]

    def free(self) -> None:
        """Give the sequence's blocks back (registered ones stay cached). Idempotent."""
        with self._pool._lock:
            self._release()

    def _release(self) -> None:
        """Free the C sequence; the caller holds the pool's lock."""
        if self._handle is not None:
            self._pool._lib.kvc_sequence_free(self._handle)
            self._handle = None
            self._tokens = []

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None and self._pool._pool is not None:
            self.free()

    def save_state(self, path: str | os.PathLike) -> None:
        """Write the sequence's cache rows, in their stored types, and its tokens to `path`, atomically
        (the session format of Model.save_state; README "Sessions")."""
        pool = self._pool
        with pool._lock:
            pool._open()
            if pool._lib.kvc_session_save(pool._m, self.handle(pool), ffi.NULL, os.fsencode(path)) != 0:
                raise ValueError(last_error(pool._lib))

    def _lib_call(self, name: str, *args) -> int:
        """Call C function `name` on this sequence; ValueError on -1. The caller holds the pool's lock."""
        rc = getattr(self._pool._lib, name)(self.handle(self._pool), *args)
        if rc < 0:
            raise ValueError(last_error(self._pool._lib))
        return rc
