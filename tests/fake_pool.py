"""A small deterministic stand-in for kvc.Pool (same API, see kvc/pool.py) for testing scheduling
decisions: real block accounting (reference counts, copy-on-write, a prefix cache by hash chain with
LRU eviction, PoolFull) and logits that are a function of each sequence's whole token history, so
a sequence recomputed after preemption (or run beside others) gives the same next token only if the
scheduler fed it exactly the same tokens."""
from __future__ import annotations

import collections
import math
import zlib
from dataclasses import dataclass

import numpy as np

from kvc.pool import PoolFull


@dataclass
class FakeStats:
    total: int
    used: int
    cached: int
    free: int
    prefix_hit_tokens: int


class FakeSequence:
    def __init__(self, pool: "FakePool", blocks=(), tokens=()):
        self.pool = pool
        self.blocks = list(blocks)
        self.tokens = list(tokens)  # the token ids at positions 0..len-1
        self.freed = False

    @property
    def len(self) -> int:
        return len(self.tokens)

    def reuse_prefix(self, tokens) -> int:
        assert self.len == 0 and not self.freed
        p, bs, h, n = self.pool, self.pool.block_size, 0, 0
        while n + bs <= len(tokens) - 1:
            h = p.chain(h, tokens[n:n + bs])
            block = p.by_hash.get(h)
            if block is None:
                break
            p.ref(block)
            self.blocks.append(block)
            n += bs
        self.tokens = list(tokens[:n])
        p.prefix_hit_tokens += n
        return n

    def fork(self) -> "FakeSequence":
        assert not self.freed
        for b in self.blocks:
            self.pool.ref(b)
        child = FakeSequence(self.pool, self.blocks, self.tokens)
        self.pool.live.append(child)
        return child

    def free(self) -> None:
        if not self.freed:
            self.freed = True
            for b in self.blocks:
                self.pool.unref(b)
            self.blocks = []
            self.pool.live.remove(self)


class FakePool:
    """blocks_total blocks of block_size positions; logits over `vocab` ids."""

    def __init__(self, blocks: int, block_size: int = 4, max_seq_len: int = 256, vocab: int = 64):
        self.blocks_total, self.block_size, self.max_seq_len, self.vocab = blocks, block_size, max_seq_len, vocab
        self.refs = [0] * blocks
        self.free_list = list(range(blocks))
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU order
        self.hash_of: dict[int, int] = {}  # registered block -> its chain hash
        self.by_hash: dict[int, int] = {}
        self.prefix_hit_tokens = 0
        self.live: list[FakeSequence] = []
        self.steps: list[list[tuple[FakeSequence, int]]] = []  # (sequence, tokens) per step

    @staticmethod
    def chain(prev: int, tokens) -> int:
        return zlib.crc32(np.array([prev, *tokens], dtype=np.int64).tobytes())

    def ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self.cached.pop(block)
        self.refs[block] += 1

    def unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.cached[block] = None
            else:
                self.free_list.append(block)

    def take(self) -> int:
        if self.free_list:
            block = self.free_list.pop()
        else:
            block, _ = self.cached.popitem(last=False)  # the least recently used
            del self.by_hash[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def stats(self) -> FakeStats:
        used = sum(r > 0 for r in self.refs)
        return FakeStats(self.blocks_total, used, len(self.cached), len(self.free_list), self.prefix_hit_tokens)

    def sequence(self) -> FakeSequence:
        seq = FakeSequence(self)
        self.live.append(seq)
        return seq

    def blocks_needed(self, seq: FakeSequence, n: int) -> int:
        new = math.ceil((seq.len + n) / self.block_size) - len(seq.blocks)
        cow = seq.len % self.block_size != 0 and self.refs[seq.blocks[-1]] > 1
        return new + cow

    def step(self, work) -> np.ndarray:
        assert work and len({id(s) for s, _ in work}) == len(work)
        for seq, tokens in work:
            assert not seq.freed and tokens and seq.len + len(tokens) <= self.max_seq_len
        if sum(self.blocks_needed(s, len(t)) for s, t in work) > len(self.free_list) + len(self.cached):
            raise PoolFull("fake pool full")
        self.steps.append([(s, len(t)) for s, t in work])
        rows = np.zeros((len(work), self.vocab), dtype=np.float32)
        for i, (seq, tokens) in enumerate(work):
            bs = self.block_size
            if seq.len % bs and self.refs[seq.blocks[-1]] > 1:  # copy on write
                old = seq.blocks[-1]
                seq.blocks[-1] = self.take()
                self.unref(old)
            for t in tokens:
                if seq.len % bs == 0:
                    seq.blocks.append(self.take())
                seq.tokens.append(int(t))
                if seq.len % bs == 0:  # a block filled: register it
                    h = 0
                    for k in range(0, seq.len, bs):
                        h = self.chain(h, seq.tokens[k:k + bs])
                    block = seq.blocks[-1]
                    if h not in self.by_hash and block not in self.hash_of:
                        self.by_hash[h], self.hash_of[block] = block, h
            rows[i, self.next_token(seq.tokens)] = 1.0
        return rows

    def next_token(self, history) -> int:
        """The greedy next token after history (its whole history decides)."""
        return zlib.crc32(np.array(history, dtype=np.int64).tobytes()) % self.vocab

    def close(self) -> None:
        pass
