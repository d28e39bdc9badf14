"""The paged KV cache (kvc.Pool): batched steps over sequences whose blocks lie anywhere in one pool
compute what the torch reference computes for each sequence alone, and the pool's books (forks with
copy-on-write, truncation, the prefix cache and its LRU eviction, running out) stay exact."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import kvc
from kvc.reference import Llama
from helpers import write_random_model

TOL = 1e-4  # fp32: the batched step against the reference, every position
CONFIGS = [
    ("mha", dict(n_heads=4, n_kv_heads=4)),
    ("gqa", dict(n_heads=8, n_kv_heads=2)),
    ("mqa", dict(n_heads=4, n_kv_heads=1, shared_classifier=False)),
]
CACHE_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "iq4_nl"]


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def pair(request, tmp_path_factory):
    name, overrides = request.param
    path = tmp_path_factory.mktemp(name) / "model.bin"
    write_random_model(path, seed=len(name), **overrides)
    model = kvc.Model(path, seq_len=16)  # the pools below bring their own caches
    yield model, Llama.load(path)
    model.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model.bin"
    write_random_model(path, seed=5, dim=128, n_heads=4, n_kv_heads=2, key_mean=True)  # head_dim 32: one q block
    return path


def prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def scatter(pool: kvc.Pool) -> list:
    """Leaves only every other block of an empty pool free, so that no two free blocks are adjacent
    and every sequence after this holds blocks that lie apart (each read as a run of its own):
    fills every block with a one-token sequence and frees those holding even blocks. Returns the
    sequences still holding the odd ones (free them to give those back)."""
    holders = [pool.sequence() for _ in range(pool.stats().total)]
    pool.step([(h, [1]) for h in holders])
    kept = []
    for h in holders:
        if h.blocks[0] % 2:
            kept.append(h)
        else:
            h.free()
    assert pool.stats().free == pool.stats().total - len(kept)
    return kept


def run_interleaved(pool: kvc.Pool, texts: list[list[int]], chunk: int) -> list[dict[int, np.ndarray]]:
    """Feed every text through the pool in chunks, all sequences in each step (prompt chunks of
    different sizes side by side); returns each text's logits by position."""
    seqs = [pool.sequence() for _ in texts]
    done = [0] * len(texts)
    got: list[dict[int, np.ndarray]] = [{} for _ in texts]
    step = 0
    while any(d < len(t) for d, t in zip(done, texts)):
        live = [i for i, t in enumerate(texts) if done[i] < len(t)]
        sizes = {i: 1 if (i + step) % 3 == 0 else chunk for i in live}  # decode-sized and prompt-sized mixed
        logits = pool.step([(seqs[i], texts[i][done[i]:done[i] + sizes[i]]) for i in live])
        for row, i in enumerate(live):
            done[i] = min(done[i] + sizes[i], len(texts[i]))
            got[i][done[i] - 1] = logits[row]
        step += 1
    for s in seqs:
        s.free()
    return got


def test_batched_step_matches_reference_for_every_sequence(pair):
    model, ref = pair
    texts = prompts(model.config.vocab_size, [37, 5, 70, 16, 1, 52])
    with model.pool(blocks=128, block_size=16) as pool:
        pool.poison()  # a read of any position no sequence wrote turns the logits NaN
        holders = scatter(pool)  # every sequence's blocks lie apart
        got = run_interleaved(pool, texts, chunk=11)
        assert pool.stats().used == len(holders)
    checked = 0
    for text, logits in zip(texts, got):
        full = ref.forward_full(text)
        for pos, row in logits.items():
            assert np.abs(row - full[pos]).max() <= TOL, pos
            checked += 1
    assert checked > 25  # every step's row: the decode-sized steps check position after position


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_block_sizes(pair, block_size):
    model, ref = pair
    texts = prompts(model.config.vocab_size, [45, 20], seed=block_size)
    with model.pool(blocks=200, block_size=block_size) as pool:
        pool.poison()
        got = run_interleaved(pool, texts, chunk=7)
    for text, logits in zip(texts, got):
        full = ref.forward_full(text)
        assert max(np.abs(row - full[pos]).max() for pos, row in logits.items()) <= TOL


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_every_cache_type_works_paged(tiny, cache_type):
    """A pooled sequence whose blocks lie apart, interleaved with another's, gives exactly the
    logits a Model with the same cache type gives when both decode token by token: the same rows
    are stored, and attention reads them in the same order whatever blocks they lie in."""
    text = prompts(300, [75], seed=3)[0]
    with kvc.Model(tiny, cache_type_k=cache_type, cache_type_v=cache_type) as model:
        model.reset(float("nan"))
        want = [model.forward([t], i)[0] for i, t in enumerate(text)]
        with model.pool(blocks=48, block_size=8) as pool:
            pool.poison()
            holders = scatter(pool)  # (kept: a freed sequence gives its blocks back)
            seq, other = pool.sequence(), pool.sequence()
            got = []
            for t in text:
                pool.step([(other, [t])])
                got.append(pool.step([(seq, [t])])[0])
            blocks = seq.blocks
            assert len(blocks) == 10 and all(b - a > 1 for a, b in zip(blocks, blocks[1:]))  # no two adjacent
            assert pool.stats().used == len(holders) + 20
    assert np.array_equal(np.array(got), np.array(want))


def test_sequences_grow_into_consecutive_blocks(tiny):
    """Sequences stepped together each take the block after their last while it is free, and start
    (or move on, when that block is taken) in the middle of the longest run of free blocks: their
    tables stay runs that attention reads as one, not blocks alternating between sequences."""
    with kvc.Model(tiny, seq_len=16) as model, model.pool(blocks=64, block_size=8) as pool:
        seqs = [pool.sequence() for _ in range(4)]
        for i in range(5):
            pool.step([(s, list(range(1 + 8 * i, 9 + 8 * i))) for s in seqs])
        tables = [s.blocks for s in seqs]
        assert tables == [list(range(first, first + 5)) for first in (32, 16, 48, 8)]
        nxt = pool.sequence()  # free runs: 0-7, 13-15, 21-31, 37-47, 53-63: the first longest is 21-31
        pool.step([(nxt, [1])])
        assert nxt.blocks == [26]
        for _ in range(6):  # seqs[1] grows through 21-25 into nxt's 26: on to the middle of 37-47
            pool.step([(seqs[1], [7] * 8)])
        assert seqs[1].blocks == list(range(16, 26)) + [42]


def test_fork_copies_on_write(pair):
    model, ref = pair
    base, tail_a, tail_b = prompts(model.config.vocab_size, [21, 6, 9], seed=4)
    with model.pool(blocks=30, block_size=8) as pool:
        pool.poison()
        parent = pool.sequence()
        pool.step([(parent, base)])
        used = pool.stats().used
        child = parent.fork()
        assert pool.stats().used == used  # the fork shares every block
        assert child.tokens == parent.tokens == base
        got_child = [pool.step([(child, [t])])[0] for t in tail_a]
        got_parent = [pool.step([(parent, [t])])[0] for t in tail_b]
        assert pool.stats().used > used  # the shared last block was copied
    assert np.abs(np.array(got_child) - ref.forward_full(base + tail_a)[len(base):]).max() <= TOL
    assert np.abs(np.array(got_parent) - ref.forward_full(base + tail_b)[len(base):]).max() <= TOL


def test_truncate_rolls_back(pair):
    model, ref = pair
    text, other = prompts(model.config.vocab_size, [40, 12], seed=5)
    with model.pool(blocks=20, block_size=8) as pool:
        pool.poison()
        seq = pool.sequence()
        pool.step([(seq, text)])
        before = pool.stats().used
        seq.truncate(17)
        assert seq.len == 17 and seq.tokens == text[:17]
        assert pool.stats().used == before - 2  # positions 24..39 lay in two blocks of their own
        logits = pool.step([(seq, other)])[0]
    assert np.abs(logits - ref.forward_full(text[:17] + other)[-1]).max() <= TOL


def test_prefix_cache_reuses_whole_blocks_by_content(pair):
    model, ref = pair
    system, question = prompts(model.config.vocab_size, [40, 9], seed=6)
    with model.pool(blocks=30, block_size=8) as pool:
        pool.poison()
        first = pool.sequence()
        pool.step([(first, system + question)])
        first.free()
        stats = pool.stats()
        assert stats.used == 0 and stats.cached == 6  # 49 positions: 6 full blocks kept

        again = pool.sequence()
        assert again.reuse_prefix(system + question) == 48  # whole blocks, one token left to run
        logits = pool.step([(again, (system + question)[48:])])[0]
        assert np.abs(logits - ref.forward_full(system + question)[-1]).max() <= TOL

        changed = list(system)
        changed[20] = (changed[20] + 1) % model.config.vocab_size  # in block 2: only blocks 0-1 match
        other = pool.sequence()
        assert other.reuse_prefix(changed + question) == 16
        logits = pool.step([(other, (changed + question)[16:])])[0]
        assert np.abs(logits - ref.forward_full(changed + question)[-1]).max() <= TOL
        assert pool.stats().prefix_hit_tokens == 48 + 16

        shifted = pool.sequence()  # the same tokens one position later are other blocks
        assert shifted.reuse_prefix([1] + system) == 0


def test_cached_blocks_are_evicted_least_recent_first(pair):
    model, _ = pair
    a, b, c = prompts(model.config.vocab_size, [33, 33, 60], seed=7)
    with model.pool(blocks=10, block_size=8) as pool:
        for text in (a, b):
            seq = pool.sequence()
            pool.step([(seq, text)])
            seq.free()
        assert pool.stats().cached == 8 and pool.stats().free == 2
        seq = pool.sequence()
        pool.step([(seq, c)])  # 8 blocks: the 2 free ones, then 6 cached ones evicted: all of a's, then b's last two
        assert pool.stats().cached == 2
        seq.free()
        assert pool.sequence().reuse_prefix(a + [0]) == 0
        assert pool.sequence().reuse_prefix(b + [0]) == 16  # a sequence's blocks are released tail first
        assert pool.sequence().reuse_prefix(c + [0]) == 56


def test_out_of_blocks_changes_nothing(pair):
    model, ref = pair
    text, more = prompts(model.config.vocab_size, [30, 20], seed=8)
    with model.pool(blocks=5, block_size=8) as pool:
        seq, other = pool.sequence(), pool.sequence()
        pool.step([(seq, text)])  # 4 blocks
        assert pool.blocks_needed(seq, 20) == 3
        with pytest.raises(kvc.PoolFull, match="out of KV blocks"):
            pool.step([(other, [1]), (seq, more)])
        assert seq.len == 30 and other.len == 0 and pool.stats().used == 4
        logits = pool.step([(seq, more[:2])])[0]
    assert np.abs(logits - ref.forward_full(text + more[:2])[-1]).max() <= TOL


def test_misuse_raises(tiny):
    with kvc.Model(tiny, seq_len=16) as model:
        pool, other_pool = model.pool(blocks=4, block_size=16), model.pool(blocks=2)
        seq = pool.sequence()
        with pytest.raises(ValueError, match="at least one token"):
            pool.step([(seq, [])])
        with pytest.raises(ValueError, match="token ids"):
            pool.step([(seq, [300])])
        with pytest.raises(ValueError, match="twice"):
            pool.step([(seq, [1]), (seq, [2])])
        with pytest.raises(ValueError, match="another pool"):
            other_pool.step([(seq, [1])])
        with pytest.raises(ValueError, match="can take"):
            pool.step([(seq, [1] * (pool.max_seq_len + 1))])
        with pytest.raises(ValueError):
            seq.truncate(1)  # longer than it is
        with pytest.raises(ValueError, match="blocks or memory"):
            model.pool(blocks=4, memory=1 << 20)
        with pytest.raises(ValueError, match="block size|block_size"):
            model.pool(block_size=0)
        pool.step([(seq, [1, 2, 3])])
        with pytest.raises(ValueError, match="empty"):
            seq.reuse_prefix([1, 2, 3])
        seq.free()
        seq.free()
        with pytest.raises(ValueError, match="freed"):
            pool.step([(seq, [1])])
        kept = pool.sequence()
        pool.close()
        with pytest.raises(ValueError, match="closed"):
            pool.sequence()
        with pytest.raises(ValueError):
            kept.fork()
        other_pool.close()


def test_memory_sizes_the_pool(tiny):
    with kvc.Model(tiny, seq_len=16) as model:
        one = model.pool(blocks=1, block_size=16)
        with model.pool(memory=10 * one.block_bytes + 5, block_size=16) as pool:
            assert pool.blocks_total == 10
        one.close()


def test_threads_share_a_pool_safely(pair):
    model, ref = pair
    texts = prompts(model.config.vocab_size, [30] * 4, seed=9)
    results: dict[int, list[np.ndarray]] = {}
    with model.pool(blocks=40, block_size=8) as pool:
        def work(i: int) -> None:
            seq = pool.sequence()
            results[i] = [pool.step([(seq, [t])])[0] for t in texts[i]]
            seq.free()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pool.stats().used == 0
    for i, text in enumerate(texts):
        assert np.abs(np.array(results[i]) - ref.forward_full(text)).max() <= TOL
