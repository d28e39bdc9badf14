"""Sessions: a sequence saved to a file (Model.save_state, the CLI's --session) continues, restored in
a fresh Model or process, exactly as the uninterrupted one; anything that is not its own session
is refused with one line; writes are atomic."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

import kvc
from helpers import random_tokens, run_cli, write_chat_model, write_random_model

HEADER_BYTES = 112  # run.c's SessionHeader
VERSION_OFFSET = 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "model.bin"
    write_random_model(path, seed=21, dim=128, n_heads=4, n_kv_heads=2, seq_len=128, key_mean=True)
    return path


@pytest.mark.parametrize("kw", [dict(), dict(cache_type_k="q8_0", cache_type_v="f16"),
                                dict(cache_type_k="iq4_nl", cache_type_v="iq4_nl"), dict(window=32, sinks=4),
                                dict(window=16, sinks=0, cache_type_k="iq4_nl", cache_type_v="q8_0")],
                         ids=["f32", "q8_0-f16", "iq4_nl", "window", "window-iq4_nl"])
def test_restored_state_continues_exactly(model_path, tmp_path, kw):
    first, then = random_tokens(70), random_tokens(40, seed=1)  # with a window: past several evictions
    with kvc.Model(model_path, **kw) as model:
        model.forward(first, 0)
        model.save_state(tmp_path / "s.kvc")
        want = model.forward(then, len(first))
    with kvc.Model(model_path, **kw) as fresh:
        fresh.reset(float("nan"))  # the restored rows must be all it reads
        fresh.load_state(tmp_path / "s.kvc")
        got = fresh.forward(then, len(first))
    assert np.array_equal(got, want)


def test_the_file_is_the_rows_that_hold_tokens(model_path, tmp_path):
    with kvc.Model(model_path, cache_type_k="q8_0", cache_type_v="f32") as model:
        model.forward(random_tokens(50), 0)
        model.save_state(tmp_path / "s.kvc")
        c = model.config
    q8_row, f32_row = 34 * c.head_dim // 32, 4 * c.head_dim
    assert os.path.getsize(tmp_path / "s.kvc") == HEADER_BYTES + 50 * 4 + c.n_layers * c.n_kv_heads * 50 * (q8_row + f32_row)
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("session_chat") / "chat.bin")


def test_python_chat_resumes_from_a_saved_state(chat_path, tmp_path):
    first = [{"role": "user", "content": "hello"}]
    with kvc.Model(chat_path) as model:
        reply = "".join(model.chat(first, max_tokens=10, temperature=0))
        model.save_state(tmp_path / "s.kvc")
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
        want = "".join(model.chat(second, max_tokens=10, temperature=0))
    with kvc.Model(chat_path) as fresh:
        fresh.load_state(tmp_path / "s.kvc")
        got = "".join(fresh.chat(second, max_tokens=10, temperature=0))
        assert fresh.stats.cached_tokens > 10  # the first turn came from the file
    assert got == want


def test_refusals(model_path, tmp_path):
    path = tmp_path / "s.kvc"
    with kvc.Model(model_path) as model:
        model.forward(random_tokens(20), 0)
        model.save_state(path)
    data = path.read_bytes()
    other_path = tmp_path / "other.bin"
    write_random_model(other_path, seed=22, dim=128, n_heads=4, n_kv_heads=2, seq_len=128)
    cases = {
        "another model": (other_path, {}, data),
        "cache types": (model_path, dict(cache_type_k="f16"), data),
        "rotated": (model_path, dict(cache_rotate=True), data),
        "a window": (model_path, dict(window=32), data),
        "truncated": (model_path, {}, data[:-7]),
        "bytes after its end": (model_path, {}, data + b"x"),
        "checksum": (model_path, {}, data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]),
        "newer kvc": (model_path, {}, data[:VERSION_OFFSET] + struct.pack("<I", 2) + data[VERSION_OFFSET + 4:]),
        "not a kvc session": (model_path, {}, b"GGUF" + data[4:]),
        "empty": (model_path, {}, b""),
    }
    for match, (checkpoint, kw, content) in cases.items():
        bad = tmp_path / "bad.kvc"
        bad.write_bytes(content)
        with kvc.Model(checkpoint, **kw) as model:
            with pytest.raises(ValueError) as e:
                model.load_state(bad)
            message = str(e.value)
            assert len(message.splitlines()) == 1
            assert match in message or (match == "empty" and "empty" in message.lower()), (match, message)
    with kvc.Model(model_path) as model, pytest.raises(FileNotFoundError):
        model.load_state(tmp_path / "missing.kvc")


def test_a_failed_write_leaves_nothing_behind(model_path, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # rename() over a directory fails after the data was written
    (target / "keep").write_text("x")
    with kvc.Model(model_path) as model:
        model.forward(random_tokens(10), 0)
        with pytest.raises(ValueError, match="cannot write session"):
            model.save_state(target)
    assert sorted(os.listdir(tmp_path)) == ["taken"] and os.listdir(target) == ["keep"]


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_cli_chat_session_resumes_in_a_fresh_process(chat_path, tmp_path, temperature):
    args = [chat_path, "-m", "chat", "-t", temperature, "-s", "5", "-n", "12", "-y", "sys"]
    whole = run_cli(*args, stdin=b"hello\nagain\n")
    assert whole.returncode == 0, whole.stderr
    session = tmp_path / "chat.kvc"
    first = run_cli(*args, "--session", session, stdin=b"hello\n")
    second = run_cli(*args[:-4], "-s", "99", "-n", "12", "--session", session, stdin=b"again\n")  # the seed comes back from the file
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    def replies(out: bytes) -> list[bytes]:
        return [turn for turn in out.split(b"User: ") if turn.strip()]

    assert len(replies(whole.stdout)) == 2
    assert replies(first.stdout) + replies(second.stdout) == replies(whole.stdout)
    assert b"resumed a chat of" in second.stderr
    bad = run_cli(chat_path, "-n", "4", "-i", "a", "--session", session)
    assert bad.returncode != 0 and b"--session works with -m chat" in bad.stderr


def test_context_shift_keeps_the_system_prompt_and_the_last_turns(chat_path, tmp_path):
    """A chat longer than its context drops its oldest turns: the cache then holds exactly what a
    fresh run of the tokens kept computes (the session file shows both)."""
    session = tmp_path / "chat.kvc"
    out = run_cli(chat_path, "-m", "chat", "-t", "0", "-n", "20", "-c", "256", "--session", session,
                  stdin=b"".join(b"m%d\n" % i for i in range(8)))
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "[context shift: dropped the oldest" in err and "[context full" not in err
    assert err.count("[turn ") == 8
    data = session.read_bytes()
    rows = struct.unpack_from("<i", data, 48)[0]
    tokens = list(struct.unpack_from(f"<{rows}i", data, HEADER_BYTES))
    with kvc.Model(chat_path) as restored, kvc.Model(chat_path) as fresh:
        restored.load_state(session)
        fresh.forward(tokens, 0)
        (k1, v1), (k2, v2) = restored.kv_cache, fresh.kv_cache
    assert np.abs(k1[:, :rows] - k2[:, :rows]).max() <= 1e-4 and np.abs(v1[:, :rows] - v2[:, :rows]).max() <= 1e-4
    assert tokens.count(299) >= 3  # the system prompt's end and whole turns (<|im_end|> is 299)


def test_a_pool_saves_and_restores_a_sequence_into_its_prefix_cache(model_path, tmp_path):
    """A pooled sequence saved and loaded into another pool: its full blocks are cached there, and a
    prompt that starts with its tokens takes them and goes on as the original would."""
    tokens, more = random_tokens(53, seed=5), random_tokens(6, seed=6)
    with kvc.Model(model_path, seq_len=16) as model:
        with model.pool(blocks=8) as pool:
            seq = pool.sequence()
            pool.step([(seq, tokens)])
            seq.save_state(tmp_path / "p.kvc")
            want = pool.step([(seq, more)])[0]
        with model.pool(blocks=8) as other:
            other.poison()
            loaded = other.load_state(tmp_path / "p.kvc")
            assert loaded.tokens == tokens and other.stats().used == 4
            loaded.free()
            assert other.stats().cached == 3  # 48 of 53 positions in full blocks
            again = other.sequence()
            assert again.reuse_prefix(tokens + more) == 48
            got = other.step([(again, (tokens + more)[48:])])[0]
            assert np.abs(got - want).max() <= 1e-4
        with model.pool(blocks=3) as small, pytest.raises(kvc.PoolFull):
            small.load_state(tmp_path / "p.kvc")
        with model.pool(blocks=8, block_size=8) as other_blocks, pytest.raises(ValueError, match="blocks of 16"):
            other_blocks.load_state(tmp_path / "p.kvc")
