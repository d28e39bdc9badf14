"""One kvc.Model shared by threads, generators that find their cache changed under them, and Models
running side by side in threads (hardening issue, defect 5)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import kvc
from helpers import write_random_model

THREADS = 4
FORWARDS = 150  # per thread: 600 in all, as in the report


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("threads") / "m.bin"
    write_random_model(path, seq_len=64)
    return path


def prompts(n: int) -> list[list[int]]:
    """n different token sequences, of different lengths (so the runs differ in work and in cache)."""
    rng = np.random.default_rng(1)
    return [rng.integers(3, 300, 16 + 8 * (i % 4)).tolist() for i in range(n)]


def run_threads(target, args: list[tuple]) -> None:
    """Runs target(*a) for each a in its own thread; an exception in any thread fails the test."""
    errors = []

    def guarded(*a):
        try:
            target(*a)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_threads_sharing_a_model_get_the_single_threaded_logits(model_path):
    """The report: 120 of 600 forwards from two threads on one Model gave wrong logits (the threads
    ran in one sequence's scratch and cache at once). Each forward runs at position 0, so its logits
    depend on its tokens alone."""
    model = kvc.Model(model_path, threads=1)
    inputs = prompts(6)
    expected = [model.forward(tokens, 0) for tokens in inputs]
    wrong = []

    def work(t: int) -> None:
        for j in range(FORWARDS):
            k = (t + j) % len(inputs)
            if not np.array_equal(model.forward(inputs[k], 0), expected[k]):
                wrong.append((t, j))

    run_threads(work, [(t,) for t in range(THREADS)])
    assert not wrong, f"{len(wrong)} of {THREADS * FORWARDS} forwards differ from single-threaded"


def test_reads_from_other_threads_during_generation(model_path):
    """One thread generates while others encode, decode and read the cache: reads do not change the
    cache, so the generator never finds it changed, and every call gets what it gets alone."""
    model = kvc.Model(model_path, threads=1)
    texts = ["abc", "hello"]
    replies = {t: "".join(model.generate(t, max_tokens=12, temperature=0)) for t in texts}
    ids = {t: model.encode(t) for t in texts}
    decoded = {t: model.decode(ids[t]) for t in texts}
    bad = []

    def work(t: int) -> None:
        for j in range(30):
            text = texts[j % 2]
            if t == 0:
                got = "".join(model.generate(text, max_tokens=12, temperature=0))
                bad.extend([] if got == replies[text] else [("generate", j)])
            else:
                bad.extend([] if model.encode(text) == ids[text] else [("encode", j)])
                bad.extend([] if model.decode(ids[text]) == decoded[text] else [("decode", j)])
                assert model.kv_cache[0].shape[1] == model.config.seq_len

    run_threads(work, [(t,) for t in range(THREADS)])
    assert not bad, bad


def test_interleaved_generators(model_path):
    """Two generators on one Model: the one resumed after the other ran raises instead of sampling
    from the other's cache; the other goes on as if alone."""
    model = kvc.Model(model_path, threads=1)
    alone = list(model.generate("xyz", max_tokens=10, temperature=0))
    a = model.generate("abc", max_tokens=10, temperature=0)
    b = model.generate("xyz", max_tokens=10, temperature=0)
    next(a)
    first = next(b)  # b prefills its prompt over a's
    with pytest.raises(RuntimeError, match="cache changed"):
        next(a)
    assert [first, *b] == alone


@pytest.mark.parametrize("change", ["forward", "prefill", "reset", "generate"])
def test_abandoned_generator_resumed_after_a_change(model_path, change):
    model = kvc.Model(model_path, threads=1)
    gen = model.generate("abc", max_tokens=10, temperature=0)
    next(gen)
    if change == "forward":
        model.forward([5, 6, 7], 0)
    elif change == "prefill":
        model.prefill([5], 3)
    elif change == "reset":
        model.reset()
    else:
        list(model.generate("abc", max_tokens=2, temperature=0))
    with pytest.raises(RuntimeError, match="cache changed"):
        next(gen)


def test_reads_do_not_disturb_a_generator(model_path):
    """encode, decode and kv_cache leave the cache as it was: the generator goes on."""
    model = kvc.Model(model_path, threads=1)
    alone = list(model.generate("abc", max_tokens=10, temperature=0))
    gen = model.generate("abc", max_tokens=10, temperature=0)
    out = [next(gen)]
    model.encode("hi")
    model.decode([5, 6])
    model.kv_cache
    out += list(gen)
    assert out == alone


def test_unstarted_generator_starts_from_the_cache_as_it_is(model_path):
    """A generator that has not run yet has no state to lose: it starts when first asked."""
    model = kvc.Model(model_path, threads=1)
    alone = list(model.generate("abc", max_tokens=10, temperature=0))
    gen = model.generate("abc", max_tokens=10, temperature=0)
    model.forward([5, 6, 7], 0)
    assert list(gen) == alone


def test_two_models_in_two_threads(model_path):
    """Each Model has its own cache: two run at once (the C call releases the GIL) and each gets what
    it gets alone."""
    models = [kvc.Model(model_path, threads=1) for _ in range(2)]
    inputs = prompts(4)
    expected = [models[0].forward(tokens, 0) for tokens in inputs]
    replies = ["".join(models[0].generate(t, max_tokens=12, temperature=0)) for t in ("abc", "xyz")]
    wrong = []

    def work(i: int) -> None:
        model = models[i]
        for j in range(60):
            k = (i + j) % len(inputs)
            if not np.array_equal(model.forward(inputs[k], 0), expected[k]):
                wrong.append(("forward", i, j))
            if "".join(model.generate(("abc", "xyz")[j % 2], max_tokens=12, temperature=0)) != replies[j % 2]:
                wrong.append(("generate", i, j))

    run_threads(work, [(0,), (1,)])
    assert not wrong, wrong


def test_close_while_another_thread_runs(model_path):
    """close() waits for a call in progress; the other thread's next call raises ValueError."""
    model = kvc.Model(model_path, threads=1)
    inputs = prompts(2)
    started = threading.Event()
    outcome = []

    def work() -> None:
        try:
            while True:
                model.forward(inputs[0], 0)
                started.set()
        except ValueError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=work)
    worker.start()
    assert started.wait(60)
    model.close()
    worker.join(60)
    assert outcome == ["the model is closed"]
