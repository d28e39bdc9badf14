"""The `./run` command line: generation, its statistics, sampling flags, usage errors and chat mode.

Greedy output is checked token for token against the torch reference (kvc.reference.Llama).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli, write_chat_model, write_random_model
from kvc import Model
from kvc.reference import Llama

PROMPT = "Once upon a time, a café"
STEPS = 20
CFG = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=128)
STATS = re.compile(r"^prompt (\d+) tokens, (\d+(?:\.\d+)?) tok/s \| generated (\d+) tokens, (\d+(?:\.\d+)?) tok/s$")


def ok(proc: subprocess.CompletedProcess) -> tuple[bytes, str]:
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    return proc.stdout, proc.stderr.decode("utf-8", "replace")


def stats_of(stderr: str) -> tuple[int, int]:
    """(prompt tokens, generated tokens) from the one stats line, which is stderr's last line."""
    lines = [l for l in stderr.splitlines() if STATS.match(l)]
    assert len(lines) == 1 and stderr.splitlines()[-1] == lines[0], stderr
    m = STATS.match(lines[0])
    return int(m.group(1)), int(m.group(3))


def generated(stdout: bytes) -> bytes:
    """What came after the echoed prompt (stdout is prompt + generated text + newline)."""
    head = PROMPT.encode()
    assert stdout.startswith(head), stdout[:100]
    assert stdout.endswith(b"\n"), stdout[-100:]
    return stdout[len(head):-1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model.bin"
    write_random_model(path, seed=11, **CFG)
    return path


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory) -> Path:
    """The same kind of model with <|im_start|>/<|im_end|> control tokens and a ChatML template."""
    return write_chat_model(tmp_path_factory.mktemp("cli_chat") / "chat.bin", **dict(CFG, seq_len=256))  # room for two turns


@pytest.fixture(scope="module")
def reference_greedy(model_path) -> tuple[list[int], list[int], bytes]:
    """(prompt ids, greedy ids up to EOS, their bytes as the CLI prints them) from the torch reference."""
    m = Model(model_path)
    ids = m.encode(PROMPT)
    gen = Llama.load(model_path).greedy(ids, STEPS)
    if m.config.eos_id in gen:
        gen = gen[:gen.index(m.config.eos_id)]
    text, prev = b"", ids[-1]
    for t in gen:
        text += m.token_bytes(prev, t)
        prev = t
    return ids, gen, text


def test_greedy_generation(model_path, reference_greedy):
    ids, gen, text = reference_greedy
    assert len(gen) >= 5 and len(set(gen)) > 2  # a real continuation, not EOS or one token repeated
    out1, err1 = ok(run_cli(model_path, "-t", "0", "-n", STEPS, "-i", PROMPT))
    out2, _ = ok(run_cli(model_path, "-t", "0", "-n", STEPS, "-i", PROMPT))
    assert out1 == out2  # deterministic
    assert generated(out1) == text  # the reference's greedy tokens, byte for byte
    assert stats_of(err1) == (len(ids), len(gen))


def test_greedy_generate_python_matches_reference(model_path, reference_greedy):
    ids, gen, text = reference_greedy
    m = Model(model_path)
    out = "".join(m.generate(PROMPT, max_tokens=STEPS, temperature=0))
    assert out == text.decode("utf-8", "replace")
    assert m.stats.prompt_tokens == len(ids) and m.stats.generated_tokens == len(gen)
    assert m.stats.stop_reason == ("length" if len(gen) == STEPS else "stop")


def test_seeded_sampling(model_path):
    args = (model_path, "-t", "1", "-n", STEPS, "-i", PROMPT)
    a, err = ok(run_cli(*args, "-s", "42"))
    b, _ = ok(run_cli(*args, "-s", "42"))
    c, _ = ok(run_cli(*args, "-s", "43"))
    greedy, _ = ok(run_cli(model_path, "-t", "0", "-n", STEPS, "-i", PROMPT))
    assert a == b
    assert a != c and a != greedy
    # the library's sampler with the same seed gives the same text
    m = Model(model_path)
    assert "".join(m.generate(PROMPT, max_tokens=STEPS, temperature=1, top_p=0.9, seed=42)) == \
        generated(a).decode("utf-8", "replace")
    assert stats_of(err)[1] == m.stats.generated_tokens


def test_top_k_and_top_p(model_path):
    """-k and -p change what is sampled: at a fixed seed and a temperature above 0, a filter that keeps only
    the most probable token gives exactly the greedy output, while the same run without it does not."""
    greedy, _ = ok(run_cli(model_path, "-t", "0", "-n", STEPS, "-i", PROMPT))

    def sampled(*flags: str, temperature: str = "1.5") -> bytes:
        out, err = ok(run_cli(model_path, "-t", temperature, "-s", "7", "-n", STEPS, "-i", PROMPT, *flags))
        generated(out)
        assert 1 <= stats_of(err)[1] <= STEPS, (flags, err)
        return out

    for flags in (["-k", "5"], ["-p", "0.5"], ["-k", "5", "-p", "0.5"], ["-k", "100000"], ["-p", "1"]):
        sampled(*flags, temperature="1")
    # no filter (top-k 0 and top-p 1 are off) samples away from greedy at this seed, and so does the
    # default top-p 0.9, differently: a -k or -p that were ignored could not give the greedy output below
    unfiltered, default = sampled("-k", "0", "-p", "1"), sampled()
    assert unfiltered != greedy and default != greedy and default != unfiltered
    # a filter that keeps only the most probable token is greedy whatever the temperature: -k alone with
    # top-p off, -p alone with top-k off (1% of the mass is only the top token on this model), and each
    # with the other at its default
    for flags in (["-k", "1", "-p", "1"], ["-k", "0", "-p", "0.01"], ["-k", "1"], ["-p", "0.000001"]):
        assert sampled(*flags) == greedy, flags
    # filters in between keep more than the top token: neither greedy nor unfiltered, nor each other
    top5, nucleus = sampled("-k", "5", "-p", "1"), sampled("-k", "0", "-p", "0.5")
    assert len({greedy, unfiltered, top5, nucleus}) == 4


def test_threads_do_not_change_the_output(model_path):
    one, _ = ok(run_cli(model_path, "-t", "1", "-s", "5", "-n", STEPS, "-i", PROMPT, "-j", "1"))
    two, _ = ok(run_cli(model_path, "-t", "1", "-s", "5", "-n", STEPS, "-i", PROMPT, "-j", "2", threads=2))
    assert one == two


def test_help():
    proc = run_cli("-h")
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"usage: run") and b"-t <float>" in proc.stdout
    assert proc.stderr == b""


@pytest.mark.parametrize("args", [
    ["-x", "1"], ["-t"], ["-t", "abc"], ["-t", "-1"], ["-t", "nan"], ["-t", "1.0x"], ["-n", "-5"], ["-n", "1e3"],
    ["-n", "99999999999999999999"], ["-m", "foo"], ["-p", "1.5"], ["-p", "-0.1"], ["-k", "-1"], ["-c", "0"],
    ["-j", "0"], ["-s", "-3"], ["--temperature", "1"], ["-tt", "1"], ["other.bin"],
], ids=lambda a: " ".join(a))
def test_bad_usage(model_path, args):
    proc = run_cli(model_path, *args)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.startswith("error: ") and "usage: run" in err, err
    assert proc.stdout == b""


def test_no_checkpoint():
    for args in ([], ["-n", "5"]):
        proc = run_cli(*args)
        assert proc.returncode == 1 and b"usage: run" in proc.stderr, proc.stderr


def test_chat_mode_without_template(model_path):
    proc = run_cli(model_path, "-m", "chat", "-n", "5", stdin=b"hello\n")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "template" in err, err


TURN = re.compile(r"\[turn (\d+): (\d+) new prompt tokens processed, (-?\d+) cached\]")


def chat_turns(chat_path, n: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Two greedy turns with -n n: ([(turn, new, cached)], generated count of each turn)."""
    out, err = ok(run_cli(chat_path, "-m", "chat", "-t", "0", "-n", n, stdin=b"hello\nand again\n"))
    assert out.startswith(b"User: Assistant: ") and out.count(b"Assistant: ") == 2, out
    assert out.endswith(b"User: \n"), out[-50:]  # EOF ends the chat
    turns = [tuple(map(int, t)) for t in TURN.findall(err)]
    generated = [int(g) for g in re.findall(r"generated (\d+) tokens", err)]
    assert [t[0] for t in turns] == [1, 2] and len(generated) == 2, err
    return turns, generated


def test_chat_mode(chat_path):
    """Two turns: the second reuses the first's cache and processes only its new tokens."""
    turns, generated = chat_turns(chat_path, 100)
    first = Model(chat_path).chat_tokens([{"role": "user", "content": "hello"}])
    assert turns[0][1:] == (len(first), 0)
    assert generated[0] < 100  # the reply ended with its end-of-turn token, not by -n
    assert turns[1][2] >= len(first) + generated[0]  # the first turn stays cached (exact count: below)


def test_chat_cache_holds_every_reply_token(chat_path):
    first = Model(chat_path).chat_tokens([{"role": "user", "content": "hello"}])
    for n in (5, 100):  # turn 1 cut short by -n 5; with -n 100 it ends on its own and turn 2 is cut short
        turns, generated = chat_turns(chat_path, n)
        assert turns[0][1:] == (len(first), 0), (n, turns)
        # cached before turn 2: turn 1's prompt, its reply and the end-of-turn token
        assert turns[1][2] == len(first) + generated[0] + 1, (n, turns, generated)
        # turn 2's count is consistent too: a third turn would find all of turn 2 cached
        assert 0 < generated[1] <= n
