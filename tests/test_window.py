"""Bounded caches: a window with attention sinks (StreamingLLM) keeps the first positions and the
last ones, runs on past the model's context with a cache of fixed size, and computes what the torch
reference computes under the same policy, at every position across many evictions."""
from __future__ import annotations

import numpy as np
import pytest

import kvc
from kvc.reference import Llama
from helpers import random_tokens, run_cli, write_random_model

TOL = 1e-4  # fp32 cache: C against the reference
CONFIGS = [
    ("mha", dict(n_heads=4, n_kv_heads=4)),
    ("gqa", dict(n_heads=8, n_kv_heads=2)),
    ("mqa", dict(n_heads=4, n_kv_heads=1, shared_classifier=False)),
]
CONTEXT = 96  # the models' context: the texts below run past it


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def model_path(request, tmp_path_factory):
    name, overrides = request.param
    path = tmp_path_factory.mktemp(name) / "model.bin"
    write_random_model(path, seed=len(name) + 10, seq_len=CONTEXT, **overrides)
    return path


@pytest.mark.parametrize("window,sinks", [(32, 4), (32, 0), (48, 20), (16, 1)])
def test_window_matches_reference_at_every_position(model_path, window, sinks):
    tokens = random_tokens(230)  # past the context, with a dozen evictions
    want = Llama.load(model_path).forward_window(tokens, window, sinks)
    with kvc.Model(model_path, window=window, sinks=sinks) as model:
        model.reset(float("nan"))  # a read of a row never written turns the logits NaN
        chunked = np.concatenate([model.forward(tokens[i:i + 9], i) for i in range(0, len(tokens), 9)])
        one_by_one = np.concatenate([model.forward([t], i) for i, t in enumerate(tokens)])
    assert np.abs(chunked - want).max() <= TOL
    assert np.abs(one_by_one - want).max() <= TOL


def test_window_changes_only_what_it_drops(model_path):
    """Until the first eviction the window is the dense cache; after it, it is not (so the test
    above could fail if the window were ignored)."""
    tokens = random_tokens(CONTEXT, seed=1)
    dense = Llama.load(model_path).forward_full(tokens)
    with kvc.Model(model_path, window=32, sinks=4) as model:
        got = model.forward(tokens, 0)
    first_eviction = 32 + 4
    assert np.abs(got[:first_eviction] - dense[:first_eviction]).max() <= TOL
    assert np.abs(got[first_eviction:] - dense[first_eviction:]).max() > 1e-2


def test_the_cache_stays_its_size(model_path):
    with kvc.Model(model_path, window=32, sinks=4) as model:
        assert model.config.seq_len == 16 + 32  # the sinks' block and the window
        size = model.memory()["kv_cache"]
        for i in range(0, 400, 50):
            assert np.isfinite(model.forward(random_tokens(50, seed=i), i)).all()
        assert model.memory()["kv_cache"] == size
    with kvc.Model(model_path) as dense:
        assert dense.memory()["kv_cache"] == size * CONTEXT // 48


@pytest.mark.parametrize("cache_type", ["f16", "bf16", "q8_0", "iq4_nl"])
def test_window_with_cache_types(tmp_path, cache_type):
    """Keys turned back as the window moves are stored again in their type, rounded once more: the
    windowed cache's distance from the f32 window stays within twice the type's own distance from
    f32 on the dense cache, and nothing reads NaN (iq4_nl keeps position 0 in its block's sink slot;
    with no sinks that block leaves the window, and its rows must read as any other's)."""
    path = tmp_path / "model.bin"
    write_random_model(path, seed=3, dim=128, n_heads=4, n_kv_heads=2, seq_len=CONTEXT, key_mean=True)
    tokens = random_tokens(200, seed=2)
    types = dict(cache_type_k=cache_type, cache_type_v=cache_type)
    with kvc.Model(path) as exact, kvc.Model(path, **types) as typed:
        own_error = np.abs(exact.forward(tokens[:CONTEXT], 0) - typed.forward(tokens[:CONTEXT], 0)).max()
    with kvc.Model(path, window=32, sinks=0) as exact:
        want = exact.forward(tokens, 0)
    with kvc.Model(path, window=32, sinks=0, **types) as model:
        model.reset(float("nan"))
        got = np.concatenate([model.forward([t], i) for i, t in enumerate(tokens)])
    assert np.isfinite(got).all()
    assert 0 < np.abs(got - want).max() <= 2 * own_error


def test_generation_runs_past_the_context(tmp_path):
    model_path = tmp_path / "model.bin"
    write_random_model(model_path, seed=4, n_heads=4, n_kv_heads=2, seq_len=CONTEXT, eos_id=-1)  # nothing ends it early
    with kvc.Model(model_path, window=32) as model:
        pieces = list(model._generation([1, 5, 9], False, set(), 3 * CONTEXT, 0.0, 1.0, 0, 1))  # noqa: SLF001
        assert model.stats.generated_tokens == 3 * CONTEXT
    out = run_cli(model_path, "-t", "0", "-n", 3 * CONTEXT, "--window", 32, "--sinks", 4, "-i", "ab")
    assert out.returncode == 0, out.stderr
    assert f"generated {3 * CONTEXT} tokens" in out.stderr.decode()
    assert pieces


def test_bad_windows(model_path):
    for kw, match in [(dict(window=10), "multiple of 16"), (dict(window=CONTEXT, sinks=1), "at most"),
                      (dict(sinks=4), "give window"), (dict(window=32, seq_len=64), "not seq_len")]:
        with pytest.raises(ValueError, match=match):
            kvc.Model(model_path, **kw)
    with kvc.Model(model_path, window=32) as model:
        model.forward([1, 2, 3], 0)
        with pytest.raises(ValueError, match="runs on from its end"):
            model.forward([4], 1)
        model.forward([4], 3)
        model.forward([5], 0)  # starts again
    for args, match in [(["--window", "20"], "multiple of 16"), (["--sinks", "4"], "--sinks needs --window"),
                        (["--window", "32", "-c", "64"], "-c and --window"), (["--window", "0"], "bad value")]:
        out = run_cli(model_path, "-n", "4", "-i", "a", *args)
        assert out.returncode != 0 and match in out.stderr.decode()
        assert out.stderr.decode().startswith("error:") or out.stderr.decode().startswith("run:"), out.stderr


# ---- H2O: heavy hitters and the recent positions, within a budget


@pytest.mark.parametrize("budget,recent", [(40, 10), (24, 0), (64, 40)])
def test_h2o_matches_reference_at_every_position(model_path, budget, recent):
    tokens = random_tokens(CONTEXT, seed=3)  # H2O keeps RoPE at each key's own position: up to the context
    want = Llama.load(model_path).forward_h2o(tokens, budget, recent)
    with kvc.Model(model_path, h2o=budget, recent=recent) as model:
        model.reset(float("nan"))
        chunked = np.concatenate([model.forward(tokens[i:i + 9], i) for i in range(0, len(tokens), 9)])
        one_by_one = np.concatenate([model.forward([t], i) for i, t in enumerate(tokens)])
        assert model.memory()["kv_cache"] * CONTEXT == kvc.Model(model_path).memory()["kv_cache"] * budget
    assert np.abs(chunked - want).max() <= TOL
    assert np.array_equal(chunked, one_by_one)
    dense = Llama.load(model_path).forward_full(tokens)
    assert np.abs(chunked[:budget] - dense[:budget]).max() <= TOL  # nothing evicted yet
    assert np.abs(chunked[budget:] - dense[budget:]).max() > 1e-2


def test_h2o_refusals(model_path):
    for kw, match in [(dict(h2o=16, recent=16), "more than its recent"), (dict(h2o=CONTEXT + 1), "budget"),
                      (dict(recent=4), "give h2o"), (dict(h2o=16, window=32), "not window"),
                      (dict(h2o=32, cache_type_k="iq4_nl"), "iq4_nl")]:
        with pytest.raises(ValueError, match=match):
            kvc.Model(model_path, **kw)
    with kvc.Model(model_path, h2o=32) as model:
        model.forward(random_tokens(CONTEXT), 0)
        with pytest.raises(IndexError):
            model.forward([1], CONTEXT)  # past the context
        with pytest.raises(ValueError, match="runs on from its end"):
            model.forward([1], 5)
    out = run_cli(model_path, "-n", "4", "-i", "a", "--recent", "3")
    assert out.returncode != 0 and b"--recent needs --h2o" in out.stderr
    out = run_cli(model_path, "-t", "0", "-n", "200", "--h2o", "32", "-i", "ab")
    assert out.returncode == 0 and b"generated" in out.stderr, out.stderr


@pytest.mark.parametrize("window,sinks", [(32, 4), (32, 0), (48, 20)])
def test_pooled_windows_match_reference(model_path, window, sinks):
    """Windowed sequences in a shared pool, stepped together in chunks up to each one's room, blocks
    NaN-poisoned as they are freed: each gives the reference's window logits; a fork goes on alone."""
    texts = [random_tokens(170, seed=7), random_tokens(130, seed=8)]
    ref = Llama.load(model_path)
    with kvc.Model(model_path, seq_len=16) as model, model.pool(blocks=20) as pool:
        pool.poison()
        seqs = [pool.sequence(window=window, sinks=sinks) for _ in texts]
        done, got = [0, 0], [{}, {}]
        step = 0
        while any(d < len(t) for d, t in zip(done, texts)):
            live = [i for i in range(2) if done[i] < len(texts[i])]
            sizes = {i: min(seqs[i].room, 1 if (step + i) % 2 else 11, len(texts[i]) - done[i]) for i in live}
            logits = pool.step([(seqs[i], texts[i][done[i]:done[i] + sizes[i]]) for i in live])
            for row, i in enumerate(live):
                done[i] += sizes[i]
                got[i][done[i] - 1] = logits[row]
            step += 1
        child = seqs[1].fork()
        more = random_tokens(40, seed=9)
        forked = [pool.step([(child, [t])])[0] for t in more]
        with pytest.raises(ValueError, match="can take"):
            pool.step([(seqs[0], [1] * (seqs[0].room + 1))])
    for t, logits in zip(texts, got):
        want = ref.forward_window(t, window, sinks)
        assert max(np.abs(row - want[pos]).max() for pos, row in logits.items()) <= TOL
    want = ref.forward_window(texts[1] + more, window, sinks)[len(texts[1]):]
    assert np.abs(np.array(forked) - want).max() <= TOL
