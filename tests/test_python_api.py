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


# ----------------------------------------------------------------------------------------------
# Hardening: closed models, and arguments out of range (ValueError / IndexError / TypeError, never
# OverflowError from cffi or numpy)


def test_threads_and_seq_len_out_of_range(model_path):
    with pytest.raises(ValueError, match=r"threads must be 1\.\.512, got 100000"):  # the C library's bound
        kvc.Model(model_path, threads=100000)
    for kw in (dict(threads=2**31), dict(threads=2**64), dict(threads=0), dict(seq_len=2**31), dict(seq_len=-2**63),
               dict(seq_len=0)):
        with pytest.raises(ValueError):
            kvc.Model(model_path, **kw)
    with pytest.raises(TypeError):
        kvc.Model(model_path, threads=1.5)
    assert kvc.Model(model_path, threads=1, seq_len=8).config.seq_len == 8


def closed_calls(model: kvc.Model) -> dict:
    messages = [{"role": "user", "content": "hi"}]
    return {
        "forward": lambda: model.forward([1, 2]),
        "prefill": lambda: model.prefill([1, 2]),
        "reset": lambda: model.reset(),
        "kv_cache": lambda: model.kv_cache,
        "encode": lambda: model.encode("hi"),
        "decode": lambda: model.decode([5, 6]),
        "generate": lambda: model.generate("hi", max_tokens=2),
        "chat": lambda: model.chat(messages, max_tokens=2),
        "chat_prompt": lambda: model.chat_prompt(messages),
        "chat_tokens": lambda: model.chat_tokens(messages),
    }


def test_a_closed_model_refuses_every_call(model_path):
    model = kvc.Model(model_path)
    model.close()
    model.close()  # twice is fine
    for name, call in closed_calls(model).items():
        with pytest.raises(ValueError, match="the model is closed"):
            call()
            pytest.fail(name)
    with kvc.Model(model_path) as model:
        model.forward([1])
    with pytest.raises(ValueError, match="the model is closed"):
        model.forward([1])


def test_a_generator_made_before_close_raises_on_its_next_step(model_path):
    model = kvc.Model(model_path)
    started = model.generate("hello", max_tokens=20, temperature=0)
    next(started)
    unstarted = model.generate("hello", max_tokens=20, temperature=0)
    model.close()
    for gen in (started, unstarted):
        with pytest.raises(ValueError, match="the model is closed"):
            next(gen)


def test_out_of_range_integers_are_value_or_index_errors(model_path):
    model = kvc.Model(model_path)
    vocab, context = model.config.vocab_size, model.config.seq_len
    value_errors = {
        "token 2**64": lambda: model.forward([2**64]),
        "token 2**63": lambda: model.forward([2**63]),
        "token -1 and 2**63": lambda: model.forward([-1, 2**63]),
        "token -2**64": lambda: model.prefill([-2**64]),
        "token vocab": lambda: model.prefill([vocab]),
        "decode 2**64": lambda: model.decode([5, 2**64]),
        "decode -1": lambda: model.decode([-1]),
        "top_k 2**40": lambda: model.generate("a", top_k=2**40),
        "top_k -1": lambda: model.generate("a", top_k=-1),
        "seed -1": lambda: model.generate("a", seed=-1),
        "seed 2**64": lambda: model.generate("a", seed=2**64),
        "max_tokens -1": lambda: model.generate("a", max_tokens=-1),
        "temperature 1e300": lambda: model.generate("a", temperature=1e300),
        "temperature 2**1024": lambda: model.generate("a", temperature=2**1024),
        "top_p 2**2000": lambda: model.generate("a", top_p=2**2000),
        "fill 2**1024": lambda: model.reset(2**1024),
        "fill 1e300": lambda: model.reset(1e300),
    }
    for name, call in value_errors.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(name)  # reached only when nothing was raised
    index_errors = {
        "pos 2**63": lambda: model.forward([1], 2**63),
        "pos -2**63": lambda: model.forward([1], -2**63),
        "pos 2**31": lambda: model.prefill([1], 2**31),
        "pos + n beyond the context": lambda: model.forward([1, 2], context - 1),
    }
    for name, call in index_errors.items():
        with pytest.raises(IndexError):
            call()
            pytest.fail(name)
    # the edges are accepted
    list(model.generate("a", max_tokens=2, seed=2**64 - 1, top_k=2**31 - 1))
    list(model.generate("a", max_tokens=2, seed=0))
    assert model.forward([vocab - 1, 0], context - 2).shape == (2, vocab)
    for fill in (float("nan"), float("inf"), -3e38, 7):
        model.reset(fill)
    assert (model.kv_cache[0] == 7).all()


def test_arguments_of_the_wrong_type_are_type_errors(model_path):
    model = kvc.Model(model_path)
    for call in (lambda: model.forward([1.5]), lambda: model.forward("abc"), lambda: model.forward([1], 1.0),
                 lambda: model.decode([None]), lambda: model.encode(b"hi"), lambda: model.generate(5),
                 lambda: model.generate("a", top_k=1.0), lambda: model.generate("a", seed="1"),
                 lambda: model.generate("a", temperature="1"), lambda: model.reset("0")):
        with pytest.raises(TypeError):
            call()
    assert model.forward(np.array([5, 6], dtype=np.uint64)).shape == (2, model.config.vocab_size)
    assert model.forward([np.int64(5), True]).shape == (2, model.config.vocab_size)


def test_generate_checks_its_arguments_when_called(model_path):
    """Not at the first step: the error comes where the call is."""
    model = kvc.Model(model_path)
    with pytest.raises(ValueError, match="top_k"):
        model.generate("a", top_k=2**40)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("a", temperature=-1)


@pytest.mark.parametrize("flags", [["--top-k", str(2**40)], ["--seed", "-1"], ["--seed", str(2**64)],
                                   ["--context", str(2**31)], ["--context", "0"], ["--max-tokens", "-1"],
                                   ["--temperature", "1e300"], ["--temperature", "nan"], ["--top-p", "2"]])
def test_python_m_kvc_flags_out_of_range(model_path, capsys, flags):
    from kvc.__main__ import main

    assert main(["generate", str(model_path), "hello", *flags]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error:") and err.count("\n") == 1, err
