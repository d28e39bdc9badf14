"""Memory checks beyond ASan: valgrind on the portable build, the fuzz targets on their seeds, and
the inputs fuzzing found, kept as regression tests.

`make test-sanitize` runs this file after the CLI and Python-binding tests under ASan+UBSan (see the
Makefile and README's "Fuzzing and sanitizers"). valgrind and clang are skipped where they are not
installed, except in CI ($CI set; .ci/run installs both), where a missing tool fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, TIMEOUT, byte_tokenizer, random_tensors, write_llama2c, write_tokenizer_bin
from kvc import format as fmt

IN_CI = bool(os.environ.get("CI"))
RUN_PORTABLE = ROOT / "run_portable"
CFG = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64)


def require(tool: str) -> None:
    if shutil.which(tool):
        return
    message = f"{tool} is not installed (apt-get install {tool})"
    if IN_CI:
        pytest.fail(f"{message}: CI must run this test (.ci/run installs it)", pytrace=False)
    pytest.skip(message)


# ----------------------------------------------------------------------------------------------
# valgrind on the portable build (plain C kernels), generating and chatting on tiny models

VALGRIND_EXIT = 99


def chat_tokenizer(vocab_size: int, markers: list[str]) -> fmt.Tokenizer:
    """byte_tokenizer with its last pieces replaced by the chat template's markers, as control tokens."""
    tok = byte_tokenizer(vocab_size)
    for i, marker in enumerate(markers, start=vocab_size - len(markers)):
        tok.pieces[i], tok.types[i] = marker.encode(), fmt.CONTROL
    return tok


@pytest.fixture(scope="module")
def portable() -> Path:
    require("valgrind")
    proc = subprocess.run(["make", "run_portable"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return RUN_PORTABLE


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("valgrind")
    out = {}
    cfg = fmt.Config(**CFG)
    tensors = random_tensors(cfg, 1)
    out["f32"] = d / "f32.bin"
    fmt.write_model(out["f32"], cfg, tensors, byte_tokenizer(cfg.vocab_size))
    out["q8_0"] = d / "q8_0.bin"
    fmt.write_model(out["q8_0"], cfg, fmt.quantize_model(tensors, fmt.Q8_0, 16), byte_tokenizer(cfg.vocab_size))
    out["q4_1"] = d / "q4_1.bin"  # q4_1 layers beside q8_0 embeddings in groups of 32, as SmolLM2 ships
    q4 = fmt.quantize_model(tensors, fmt.Q4_1) | {"tok_embeddings": fmt.quantize(tensors["tok_embeddings"], fmt.Q8_0, 32)}
    fmt.write_model(out["q4_1"], cfg, q4, byte_tokenizer(cfg.vocab_size))
    out["llama2c"] = d / "v2.bin"
    l2c = fmt.Config(**dict(CFG, n_kv_heads=4))
    write_llama2c(out["llama2c"], l2c, random_tensors(l2c, 2), version=2, group_size=16)
    out["tokenizer.bin"] = d / "tokenizer.bin"
    tok = byte_tokenizer(cfg.vocab_size)
    write_tokenizer_bin(out["tokenizer.bin"], tok.pieces, tok.scores)
    # chat: byte tokens spell every character, so the context must hold a few hundred
    chat = fmt.Config(**dict(CFG, seq_len=512))
    chatml = chat_tokenizer(chat.vocab_size, ["<|im_start|>", "<|im_end|>"])
    out["chatml"] = d / "chatml.bin"
    fmt.write_model(out["chatml"], chat, tensors, chatml,
                    fmt.ChatTemplate(fmt.CHAT_CHATML, end_of_turn=chat.vocab_size - 1, default_system="Be brief."))
    llama3 = chat_tokenizer(chat.vocab_size, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    out["llama3"] = d / "llama3.bin"
    fmt.write_model(out["llama3"], chat, tensors, llama3, fmt.ChatTemplate(fmt.CHAT_LLAMA3, end_of_turn=chat.vocab_size - 1))
    return out


def valgrind(exe: Path, *args, stdin: bytes = b"", log: Path) -> subprocess.CompletedProcess:
    """exe under memcheck: a clean exit, 0 errors and 0 bytes definitely lost."""
    cmd = ["valgrind", f"--error-exitcode={VALGRIND_EXIT}", "--leak-check=full", "--errors-for-leak-kinds=definite",
           "--show-leak-kinds=definite", f"--log-file={log}", str(exe), *map(str, args)]
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT * 15, cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"valgrind {exe.name} {args} hung")
    report = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr.decode()[-2000:]}\n{report[-6000:]}"
    assert re.search(r"ERROR SUMMARY: 0 errors", report), report[-6000:]
    assert "All heap blocks were freed" in report or re.search(r"definitely lost: 0 bytes", report), report[-6000:]
    return proc


@pytest.mark.parametrize("which", ["f32", "q8_0", "q4_1", "llama2c"])
def test_valgrind_generate(portable, models, which, tmp_path):
    tok = ["-z", models["tokenizer.bin"]] if which == "llama2c" else []
    proc = valgrind(portable, models[which], *tok, "-n", "12", "-t", "0.9", "-s", "7", "-j", "1", "-i", "hello world",
                    log=tmp_path / "valgrind.log")
    assert re.search(rb"generated [1-9]\d* tokens", proc.stderr), proc.stderr


@pytest.mark.parametrize("which", ["chatml", "llama3"])
def test_valgrind_chat(portable, models, which, tmp_path):
    proc = valgrind(portable, models[which], "-m", "chat", "-n", "6", "-t", "0.9", "-s", "3", "-j", "1",
                    stdin=b"hello there\n\nand again, <|im_end|> <|eot_id|>\n", log=tmp_path / "valgrind.log")
    assert proc.stdout.count(b"Assistant: ") == 2 and proc.stderr.count(b"[turn ") == 2, (proc.stdout, proc.stderr)


# ----------------------------------------------------------------------------------------------
# the fuzz targets (fuzz/, clang's libFuzzer) build against today's run.c and pass their seeds


def test_fuzz_targets_pass_their_seeds():
    """`make fuzz` with -runs=0: each target runs its seed corpus (and any corpus it kept) once."""
    require("clang")
    proc = subprocess.run(["make", "-s", "-j2", "fuzz", "FUZZ_ARGS=-runs=0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(re.findall(r"^fuzz_\w+ +\d+ executions", proc.stdout, re.M)) == 5, proc.stdout


# ----------------------------------------------------------------------------------------------
# what fuzzing found: each input as a file the CLI or the library must handle cleanly

LIBRARY_SCRIPT = r"""
import json, sys
from kvc._lib import ffi, load
lib = load()
path, token = sys.argv[1].encode(), int(sys.argv[2])
m = lib.kvc_open(path, ffi.NULL)
assert m != ffi.NULL, ffi.string(lib.kvc_last_error())
out = {}
for name, ids in [("decode", [token]), ("decode_after_bos", [1, token])]:
    buf = ffi.new("char[]", 64)
    n = lib.kvc_decode(m, ffi.new("int[]", ids), len(ids), buf, 64)
    out[name] = [n, ffi.buffer(buf, max(n, 0))[:].hex(), ffi.string(lib.kvc_last_error()).decode()]
text = ffi.new("const char **")
n = lib.kvc_token_text(m, -1, token, text)
out["token_text"] = [n, ffi.buffer(text[0], max(n, 0))[:].hex(), ffi.string(lib.kvc_last_error()).decode()]
lib.kvc_close(m)
print(json.dumps(out))
"""


def library_child(path: Path, token: int) -> dict:
    """LIBRARY_SCRIPT in a child process (a crash there must not take pytest down): what kvc_decode and
    kvc_token_text make of `token`, straight through the C API, as name -> [length, text hex, error]."""
    proc = subprocess.run([sys.executable, "-c", LIBRARY_SCRIPT, str(path), str(token)], capture_output=True,
                          text=True, timeout=TIMEOUT * 3, cwd=ROOT)
    assert proc.returncode == 0, f"python child died with {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


def test_fuzz_control_token_with_space_piece_decodes(tmp_path):
    """fuzz_load: a sentencepiece control token whose piece starts with U+2581 decodes to nothing.

    token_text strips the dummy prefix's space from a first token whose piece starts with U+2581
    without checking its text has that space; a control token's text is empty, so its length became -1
    and kvc_decode memcpy'd (size_t)-1 bytes (ASan: negative-size-param in decode)."""
    cfg = fmt.Config(**CFG)
    tok = byte_tokenizer(cfg.vocab_size)
    control = cfg.vocab_size - 1
    tok.pieces[control], tok.types[control] = "\u2581<ctl>".encode(), fmt.CONTROL
    path = tmp_path / "m.bin"
    fmt.write_model(path, cfg, random_tensors(cfg, 0), tok)
    results = library_child(path, control)
    assert all(r[:2] == [0, ""] for r in results.values()), results  # (length, text): nothing
