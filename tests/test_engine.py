"""The C engine computes what the torch reference computes, position by position, and its KV cache is exact."""
from __future__ import annotations

import numpy as np
import pytest

import kvc
from kvc.reference import Llama
from helpers import write_random_model

# (name, config overrides): every attention layout and the hyperparameters that must come from the file
CONFIGS = [
    ("mha", dict(n_heads=4, n_kv_heads=4)),
    ("gqa3", dict(n_heads=6, n_kv_heads=2, dim=96)),
    ("gqa4", dict(n_heads=8, n_kv_heads=2)),
    ("mqa", dict(n_heads=4, n_kv_heads=1)),
    ("untied", dict(n_heads=4, n_kv_heads=2, shared_classifier=False)),
    ("theta1e5", dict(n_heads=4, n_kv_heads=2, rope_theta=1e5, norm_eps=1e-6)),
    ("head_dim", dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16)),  # q_dim 64 != dim
]
TOL = 1e-4


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def pair(request, tmp_path_factory):
    name, overrides = request.param
    path = tmp_path_factory.mktemp(name) / "model.bin"
    write_random_model(path, seed=len(name), **overrides)
    return kvc.Model(path), Llama.load(path)


def prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_logits_match_reference_at_every_position(pair):
    model, ref = pair
    tokens = prompt(150, model.config.vocab_size)  # > 2 blocks of 64
    c_logits = model.forward(tokens, 0)
    ref_logits = ref.forward_full(tokens)
    assert c_logits.shape == (150, model.config.vocab_size)
    assert np.abs(c_logits - ref_logits).max() <= TOL
    assert np.abs(ref_logits).max() > 1.0  # not trivially small


def test_cached_decode_equals_full_recomputation(pair):
    model, ref = pair
    tokens = prompt(100, model.config.vocab_size, seed=2)
    full = ref.forward_full(tokens)
    stepwise = np.concatenate([model.forward([t], i) for i, t in enumerate(tokens)])
    assert np.abs(stepwise - full).max() <= TOL
    # and the reference's own cache path agrees with its no-cache path
    ref_steps = np.concatenate([ref.forward([t], i) for i, t in enumerate(tokens)])
    assert np.abs(ref_steps - full).max() <= TOL


def test_uneven_chunks_equal_one_pass(pair):
    model, ref = pair
    tokens = prompt(140, model.config.vocab_size, seed=3)
    full = ref.forward_full(tokens)
    out, pos = [], 0
    for size in [1, 5, 64, 3, 67]:
        out.append(model.forward(tokens[pos:pos + size], pos))
        pos += size
    assert np.abs(np.concatenate(out) - full).max() <= TOL


def test_greedy_64_tokens_identical(pair):
    model, ref = pair
    start = prompt(8, model.config.vocab_size, seed=4)
    expected = ref.greedy(start, 64)
    logits = model.forward(start, 0)
    got = []
    for pos in range(len(start), len(start) + 64):
        nxt = int(np.argmax(logits[-1]))
        got.append(nxt)
        logits = model.forward([nxt], pos)
    assert got == expected
    assert len(set(got)) > 3  # the random model does not just repeat one token


def test_kv_cache_matches_reference_cache(pair):
    model, ref = pair
    tokens = prompt(40, model.config.vocab_size, seed=5)
    model.reset()
    model.forward(tokens, 0)
    ref.forward(tokens, 0)
    keys, values = model.kv_cache
    c = model.config
    assert keys.shape == (c.n_layers, c.seq_len, c.kv_dim)
    assert np.abs(keys[:, :40] - ref.k_cache[:, :40].numpy()).max() <= TOL
    assert np.abs(values[:, :40] - ref.v_cache[:, :40].numpy()).max() <= TOL
    assert not keys[:, 40:].any()  # nothing written past the sequence after reset()


def test_rewriting_a_position_replaces_its_cache_row(tmp_path):
    path = tmp_path / "m.bin"
    write_random_model(path, n_heads=4, n_kv_heads=2)
    model, ref = kvc.Model(path), Llama.load(path)
    a = prompt(30, 300, seed=6)
    b = a[:20] + prompt(10, 300, seed=7)
    model.forward(a, 0)
    got = model.forward(b[20:], 20)  # overwrite positions 20.. with a different continuation
    assert np.abs(got - ref.forward_full(b)[20:]).max() <= TOL


def test_shorter_context_shrinks_the_cache(tmp_path):
    path = tmp_path / "m.bin"
    write_random_model(path)
    model = kvc.Model(path, seq_len=32)
    assert model.config.seq_len == 32
    assert model.kv_cache[0].shape[1] == 32
    with pytest.raises(IndexError):
        model.forward([1] * 33, 0)
    ref = Llama.load(path)
    tokens = prompt(32, 300)
    assert np.abs(model.forward(tokens) - ref.forward_full(tokens)).max() <= TOL


def test_thread_count_does_not_change_results(tmp_path):
    path = tmp_path / "m.bin"
    write_random_model(path, n_heads=8, n_kv_heads=2)
    tokens = prompt(70, 300)
    one = kvc.Model(path, threads=1).forward(tokens)
    two = kvc.Model(path, threads=2).forward(tokens)
    assert np.abs(one - two).max() <= 1e-5


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_decode_split_over_threads_equals_full_recomputation(tmp_path, kv_heads):
    """Decoding one token with few kv heads splits each head's positions across threads and merges
    the partial softmaxes (flash-decoding); the result must equal the unsplit computation."""
    path = tmp_path / "m.bin"
    write_random_model(path, n_heads=4, n_kv_heads=kv_heads, seq_len=400)
    model, ref = kvc.Model(path, threads=2), Llama.load(path)
    tokens = prompt(330, 300, seed=9)
    full = ref.forward_full(tokens)
    model.forward(tokens[:300], 0)  # a long context: ranges of >= 64 positions per part
    steps = np.concatenate([model.forward([t], 300 + i) for i, t in enumerate(tokens[300:])])
    assert np.abs(steps - full[300:]).max() <= TOL


@pytest.mark.parametrize("threads", [1, 2])
def test_no_read_past_the_sequence(tmp_path, threads):
    """Cache slots not yet written hold NaN (as vLLM's tests do): any read past the sequence, in
    prefill blocks, token-by-token decode or split attention, would turn the logits into NaN."""
    path = tmp_path / "m.bin"
    write_random_model(path, n_heads=4, n_kv_heads=1, seq_len=400)
    model, ref = kvc.Model(path, threads=threads), Llama.load(path)
    model.reset(fill=np.nan)
    keys, values = model.kv_cache
    assert np.isnan(keys).all() and np.isnan(values).all()
    tokens = prompt(330, 300, seed=11)
    got = np.concatenate([model.forward(tokens[:70], 0), model.forward(tokens[70:300], 70)]
                         + [model.forward([t], 300 + i) for i, t in enumerate(tokens[300:])])
    assert np.isfinite(got).all()
    assert np.abs(got - ref.forward_full(tokens)).max() <= TOL
    keys, values = model.kv_cache
    assert np.isnan(keys[:, 330:]).all() and np.isnan(values[:, 330:]).all()  # nothing written past it either
