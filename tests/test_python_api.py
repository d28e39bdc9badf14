"""The Python face: streaming generation, seeds, stats, cache views, reset, and python -m kvc."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import kvc
from kvc.reference import Llama
from helpers import write_random_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "m.bin"
    write_random_model(path, n_heads=4, n_kv_heads=2, seq_len=96)
    return path


def test_greedy_generate_matches_reference(model_path):
    model = kvc.Model(model_path)
    ids = model.encode("hello", bos=True)
    assert ids[0] == model.config.bos_id  # the byte tokenizer adds BOS
    text = "".join(model.generate("hello", max_tokens=20, temperature=0))
    expected = Llama.load(model_path).greedy(ids, 20)
    assert model.stats.generated_tokens == 20 and model.stats.stop_reason == "length"
    assert text == model.decode(expected)


def test_seed_makes_sampling_repeatable(model_path):
    model = kvc.Model(model_path)
    a = "".join(model.generate("abc", max_tokens=30, temperature=1.0, top_p=0.9, seed=7))
    b = "".join(model.generate("abc", max_tokens=30, temperature=1.0, top_p=0.9, seed=7))
    c = "".join(model.generate("abc", max_tokens=30, temperature=1.0, top_p=0.9, seed=8))
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(model_path):
    model = kvc.Model(model_path)
    greedy = "".join(model.generate("xyz", max_tokens=15, temperature=0))
    top1 = "".join(model.generate("xyz", max_tokens=15, temperature=1.5, top_k=1, seed=3))
    assert greedy == top1


def test_generation_stops_at_the_context(model_path):
    model = kvc.Model(model_path, seq_len=16)
    pieces = list(model.generate("hi", max_tokens=100, temperature=0))
    assert model.stats.stop_reason == "context"
    # every position holds a token; the last sampled one needs no cache slot
    assert model.stats.generated_tokens == 16 - len(model.encode("hi")) + 1
    assert pieces


def test_reset_clears_the_cache(model_path):
    model = kvc.Model(model_path)
    model.forward([5, 6, 7], 0)
    keys, values = model.kv_cache
    assert keys[:, :3].any() and values[:, :3].any()
    model.reset()
    keys, values = model.kv_cache  # copies: read again
    assert not keys.any() and not values.any()


def test_kv_cache_is_a_copy(model_path):
    model = kvc.Model(model_path)
    model.forward([5, 6, 7], 0)
    keys, values = model.kv_cache
    before = keys.copy()
    keys[:] = 0
    values[:] = 0
    assert np.array_equal(model.kv_cache[0], before)  # the engine's cache is untouched


def test_sampler_arguments_are_checked(model_path):
    model = kvc.Model(model_path)
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            list(model.generate("a", max_tokens=2, **bad))


def test_python_m_kvc_generate(model_path):
    r = subprocess.run([sys.executable, "-m", "kvc", "generate", str(model_path), "hello", "--max-tokens", "10",
                        "--temperature", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    model = kvc.Model(model_path)
    assert r.stdout == "hello" + "".join(model.generate("hello", max_tokens=10, temperature=0)) + "\n"


def test_python_m_kvc_reports_bad_files(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"KVCM" + b"\0" * 10)
    r = subprocess.run([sys.executable, "-m", "kvc", "chat", str(tmp_path / "bad.bin")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1
