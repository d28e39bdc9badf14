"""Bad input never crashes kvc: the CLI exits 1 with one `error:` line, Python raises ValueError/OSError.

Every broken checkpoint is tried three ways: `./run` (exit code exactly 1, a single stderr line
starting with "error:"), `./run_asan` (the same under AddressSanitizer + UBSan, with no sanitizer
report) and `kvc.Model` in a child Python process (so a segfault fails the tests instead of killing
pytest). The broken files are: truncations of kvc and llama2.c v0/v1/v2 files, random bytes, patched
kvc headers, corrupt tokenizer and chat template sections, and tokenizer.bin files that do not fit.
"""
from __future__ import annotations

import json
import os
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import (  # SANITIZER_ENV: reports get their own exit codes, never the clean exit 1
    ROOT, RUN, SANITIZER_ENV, TIMEOUT, byte_tokenizer, random_tensors, run_cli, write_llama2c, write_random_model, write_tokenizer_bin,
)
from kvc import Model
from kvc import format as fmt
from kvc.reference import Llama

RUN_ASAN = ROOT / "run_asan"

# small: the whole file is ~60 KB, so a sweep of ~100 truncations stays fast
CFG = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)
FIELDS = ("magic version dim hidden_dim n_layers n_heads n_kv_heads head_dim vocab_size seq_len rope_theta "
          "norm_eps shared_classifier bos_id eos_id reserved tokenizer_offset tokenizer_size template_offset "
          "template_size weights_offset weights_size group_size").split() + [f"type_{m}" for m in fmt.MATRICES]
assert len(FIELDS) == len(fmt.HEADER.unpack(bytes(fmt.HEADER.size)))



# ----------------------------------------------------------------------------------------------
# running the CLI


def error_problem(proc: subprocess.CompletedProcess) -> str | None:
    """Why proc is not a clean one-line error exit (None if it is)."""
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}: {err[-2000:]}"
    if "AddressSanitizer" in err or "runtime error" in err or "LeakSanitizer" in err:
        return f"sanitizer report (exit {proc.returncode}): {err[-4000:]}"
    if proc.returncode != 1:
        return f"exit code {proc.returncode}, expected 1; stderr: {err[-2000:]!r}"
    lines = err.splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: ") or len(lines[0]) <= len("error: "):
        return f"stderr is not one 'error: ...' line: {err[-2000:]!r}"
    return None


def assert_error(proc: subprocess.CompletedProcess) -> str:
    problem = error_problem(proc)
    assert problem is None, problem
    return proc.stderr.decode()


def sweep(exe: Path, cases: list[tuple[str, Path, Path | None]], env: dict | None = None) -> None:
    """Run exe on every case; fail listing every case that did not exit 1 with one error line."""
    failures = []
    for name, path, tok in cases:
        args = [path, "-n", "1", "-i", "hi", "-t", "0"] + (["-z", tok] if tok else [])
        problem = error_problem(run_cli(*args, exe=exe, env=env))
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# opening from Python, in a child process (a crash there must not take pytest down)

OPEN_SCRIPT = r"""
import json, sys
from kvc import Model
for name, path, tok in json.load(sys.stdin):
    print("TRY " + name, file=sys.stderr, flush=True)
    try:
        Model(path, tokenizer=tok)
        res = ["ok", ""]
    except Exception as e:
        res = [type(e).__name__, str(e)]
        res[0] += ":" + ",".join(c.__name__ for c in type(e).__mro__ if c in (ValueError, OSError))
    print("RESULT " + json.dumps([name] + res), flush=True)
"""


def python_open(cases: list[tuple[str, Path, Path | None]]) -> dict[str, tuple[str, str]]:
    """name -> (exception type name + ':' + ValueError/OSError bases, message) for each case opened."""
    payload = json.dumps([[n, str(p), str(t) if t else None] for n, p, t in cases])
    try:
        proc = subprocess.run([sys.executable, "-c", OPEN_SCRIPT], input=payload, capture_output=True, text=True,
                              timeout=TIMEOUT * 3, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"kvc.Model hung; last attempts: {(e.stderr or b'')[-300:]!r}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            name, kind, msg = json.loads(line[7:])
            results[name] = (kind, msg)
    if proc.returncode != 0:
        last = [l for l in proc.stderr.splitlines() if l.startswith("TRY ")][-1:]
        pytest.fail(f"python child died with {proc.returncode} at {last}: {proc.stderr[-3000:]}")
    return results


def assert_python_errors(cases, results, allowed=("ValueError", "OSError")) -> None:
    failures = []
    for name, _, _ in cases:
        kind, msg = results[name]
        bases = kind.split(":", 1)[1].split(",") if ":" in kind else []
        if not any(b in allowed for b in bases):
            failures.append(f"{name}: {kind} {msg!r}")
        elif not msg.strip() or "\n" in msg:
            failures.append(f"{name}: {kind} with a message that is not one line: {msg!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# writing checkpoints: kvc variants (llama2.c's v0/v1/v2 and tokenizer.bin are written by helpers)


def bpe_tokenizer(vocab_size: int) -> fmt.Tokenizer:
    """A byte-level BPE vocab (kind 2): 3 control tokens, the 256 raw bytes, a few merges, filler."""
    pieces = [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"] + [bytes([b]) for b in range(256)]
    types = [fmt.CONTROL] * 3 + [fmt.NORMAL] * 256
    ids = {p: i for i, p in enumerate(pieces)}
    merges = []
    for a, b in [(b"t", b"h"), (b"h", b"e"), (b"th", b"e"), (b" ", b"t"), (b" t", b"he"), (b"i", b"n")]:
        if a + b not in ids:
            ids[a + b] = len(pieces)
            pieces.append(a + b)
            types.append(fmt.NORMAL)
        merges.append((ids[a], ids[b]))
    while len(pieces) < vocab_size:
        pieces.append(f"<filler{len(pieces)}>".encode())
        types.append(fmt.NORMAL)
    return fmt.Tokenizer(pieces, [0.0] * vocab_size, types, kind=fmt.TOK_BYTE_BPE, flags=0,
                         pretokenizer=fmt.PRETOK_GPT2, unk_id=-1, merges=merges)


def header(path: Path) -> dict:
    return dict(zip(FIELDS, fmt.HEADER.unpack_from(path.read_bytes(), 0)))


def patched(src: Path, dst: Path, at: int | None = None, data: bytes = b"", **fields) -> Path:
    """A copy of src with header fields replaced and/or `data` written at byte offset `at`."""
    buf = bytearray(src.read_bytes())
    if fields:
        h = header(src)
        unknown = set(fields) - set(h)
        assert not unknown, unknown
        h.update(fields)
        fmt.HEADER.pack_into(buf, 0, *(h[f] for f in FIELDS))
    if at is not None:
        buf[at:at + len(data)] = data
    dst.write_bytes(bytes(buf))
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_input")
    out = {}
    out["kvc"] = d / "model.bin"
    cfg, tensors = write_random_model(out["kvc"], seed=1, **CFG)
    # byte-level BPE with merges and a ChatML template
    out["bpe"] = d / "bpe.bin"
    bcfg = fmt.Config(**dict(CFG, seq_len=128), bos_id=-1, eos_id=0)  # room for a ChatML prompt
    fmt.write_model(out["bpe"], bcfg, random_tensors(bcfg, 2), bpe_tokenizer(bcfg.vocab_size),
                    fmt.ChatTemplate(fmt.CHAT_CHATML, end_of_turn=2, default_system="Be brief."))
    # q8_0 kvc
    out["q8"] = d / "q8.bin"
    write_random_model(out["q8"], seed=3, weight_type=fmt.Q8_0, group_size=16, **CFG)
    # q4_1 layers, q8_0 embeddings and an f32 w2: every weight type in one file
    out["q4"] = d / "q4.bin"
    qcfg = fmt.Config(**CFG)
    qt = random_tensors(qcfg, 8)
    mixed = fmt.quantize_model(qt, fmt.Q4_1) | {"tok_embeddings": fmt.quantize(qt["tok_embeddings"], fmt.Q8_0, 32),
                                                 "w2": qt["w2"], "wq": fmt.quantize(qt["wq"], fmt.Q4_0)}
    fmt.write_model(out["q4"], qcfg, mixed, byte_tokenizer(qcfg.vocab_size))
    # llama2.c v0 (shared and unshared classifier), v1, v2 and their tokenizer.bin; v0/v1 are MHA there
    lcfg = fmt.Config(**dict(CFG, n_kv_heads=4))
    lt = random_tensors(lcfg, 4)
    out["v0"] = d / "v0.bin"
    write_llama2c(out["v0"], lcfg, lt, version=0)
    ucfg = fmt.Config(**dict(CFG, n_kv_heads=4), shared_classifier=False)
    out["v0u"] = d / "v0_unshared.bin"
    write_llama2c(out["v0u"], ucfg, random_tensors(ucfg, 5), version=0)
    out["v1"] = d / "v1.bin"
    write_llama2c(out["v1"], ucfg, random_tensors(ucfg, 6), version=1)
    out["v2"] = d / "v2.bin"
    write_llama2c(out["v2"], lcfg, lt, version=2, group_size=16)
    out["tok"] = d / "tokenizer.bin"
    tok = byte_tokenizer(CFG["vocab_size"])
    write_tokenizer_bin(out["tok"], tok.pieces, tok.scores)
    return out


def test_good_files_load(files):
    """The untouched files all work, so each broken variant below fails for its one defect."""
    for key in ("kvc", "bpe", "q8", "q4"):
        proc = run_cli(files[key], "-n", "3", "-t", "0", "-i", "the thin")
        assert proc.returncode == 0, (key, proc.stderr)
    for key in ("v0", "v0u", "v1", "v2"):
        proc = run_cli(files[key], "-z", files["tok"], "-n", "3", "-t", "0", "-i", "hi")
        assert proc.returncode == 0, (key, proc.stderr)
        m = Model(files[key], tokenizer=files["tok"])
        assert m.config.vocab_size == CFG["vocab_size"] and m.has_tokenizer
        ref = Llama(fmt.read_model(files[key]))  # the Python reader agrees on the weights' layout
        got, want = m.forward([1, 5, 77, 260]), ref.forward_full([1, 5, 77, 260])
        if key == "v2":  # int8 weights (and maybe activations): close, not exact; a wrong layout is far off
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
        else:
            np.testing.assert_allclose(got, want, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# missing, empty, directory


def test_missing_empty_directory_cli(files, tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    for path in (tmp_path / "nope.bin", tmp_path / "empty.bin", tmp_path):
        assert_error(run_cli(path, "-n", "1", "-i", "hi"))
    assert "nope.bin" in assert_error(run_cli(tmp_path / "nope.bin"))
    # a tokenizer that is missing, empty or a directory
    for tok in (tmp_path / "nope_tok.bin", tmp_path / "empty.bin", tmp_path):
        assert_error(run_cli(files["v0"], "-z", tok, "-n", "1", "-i", "hi"))
    # a llama2.c file without any tokenizer cannot generate text
    assert "tokenizer" in assert_error(run_cli(files["v0"], "-n", "1", "-i", "hi"))


def test_missing_empty_directory_python(files, tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError):
        Model(files["v0"], tokenizer=tmp_path / "nope_tok.bin")
    with pytest.raises(ValueError, match="empty"):
        Model(tmp_path / "empty.bin")
    with pytest.raises((ValueError, OSError)):
        Model(tmp_path)
    with pytest.raises((ValueError, OSError)):
        Model(files["v0"], tokenizer=tmp_path)
    with pytest.raises((ValueError, OSError)):
        Model(files["v0"], tokenizer=tmp_path / "empty.bin")


# ----------------------------------------------------------------------------------------------
# truncations


def truncation_offsets(size: int, extra=()) -> list[int]:
    offs = {0, 1, 2, 3, 4, 5, 7, 8, 12, 20, 27, 28, 29, 36, 37, 40, 41, 64, 100, 120, 128, 200, 255, 256, 257, 300}
    offs |= {size * k // 37 for k in range(1, 37)} | {size - 64, size - 4, size - 1} | set(extra)
    return sorted(o for o in offs if 0 <= o < size)


@pytest.fixture(scope="module")
def truncated(files, tmp_path_factory) -> list[tuple[str, Path, Path | None]]:
    d = tmp_path_factory.mktemp("truncated")
    cases = []
    for key in ("kvc", "bpe", "q8", "q4", "v0", "v0u", "v1", "v2"):
        data = files[key].read_bytes()
        extra = ()
        if key in ("kvc", "bpe", "q8", "q4"):
            h = header(files[key])
            extra = [h[f] + k for f in ("tokenizer_offset", "template_offset", "weights_offset") for k in (0, 1, 12)]
            extra += [h["tokenizer_offset"] + h["tokenizer_size"] - 1, h["template_offset"] + h["template_size"] - 1]
        for off in truncation_offsets(len(data), extra):
            p = d / f"{key}_{off}.bin"
            p.write_bytes(data[:off])
            cases.append((f"{key}[:{off}]", p, files["tok"] if key.startswith("v") else None))
    return cases


def test_truncated_cli(truncated):
    assert len(truncated) > 200
    sweep(RUN, truncated)


def test_truncated_python(truncated):
    assert_python_errors(truncated, python_open(truncated))


# ----------------------------------------------------------------------------------------------
# random bytes, wrong magic, trailing garbage


@pytest.fixture(scope="module")
def garbage(files, tmp_path_factory) -> list[tuple[str, Path, Path | None]]:
    d = tmp_path_factory.mktemp("garbage")
    rng = np.random.default_rng(7)
    cases = []

    def add(name, data, tok=None):
        p = d / f"{name}.bin"
        p.write_bytes(data)
        cases.append((name, p, tok))

    for i, n in enumerate([1, 27, 28, 255, 256, 300, 4096, 70000]):
        add(f"random{i}_{n}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    add("text", b"hello, this is not a model\n" * 20)
    add("zeros", bytes(5000))
    add("ones", b"\xff" * 5000)
    add("kvc_magic_random", fmt.MAGIC + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add("kvc_magic_zeros", fmt.MAGIC + bytes(5000))
    add("ak42_random", struct.pack("<I", fmt.LLAMA2C_MAGIC) + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    kvc = files["kvc"].read_bytes()
    add("kvc_wrong_magic", b"KVCX" + kvc[4:])
    add("kvc_lowercase_magic", b"kvcm" + kvc[4:])
    v1 = files["v1"].read_bytes()
    add("v1_version0", v1[:4] + struct.pack("<i", 0) + v1[8:], files["tok"])
    add("v1_version3", v1[:4] + struct.pack("<i", 3) + v1[8:], files["tok"])
    add("v1_shared_flag_flipped", v1[:36] + b"\x01" + v1[37:], files["tok"])  # wcls becomes trailing bytes
    for key in ("v0", "v0u", "v1", "v2"):
        data = files[key].read_bytes()
        for n in (1, 4, 64, 4096):
            add(f"{key}_trailing{n}", data + rng.integers(0, 256, n, dtype=np.uint8).tobytes(), files["tok"])
    # v0 header values: the legacy format has no magic, so its header is all there is to check
    v0 = files["v0"].read_bytes()
    for name, idx, value in [("dim0", 0, 0), ("dim_neg", 0, -32), ("dim_huge", 0, 2**31 - 1),
                             ("dim_not_multiple", 0, 30), ("hidden0", 1, 0), ("layers_neg", 2, -1),
                             ("heads0", 3, 0), ("kv0", 4, 0), ("kv3", 4, 3), ("vocab0", 5, 0),
                             ("vocab_intmin", 5, -2**31), ("vocab_huge", 5, 2**31 - 1), ("seq0", 6, 0),
                             ("seq_huge", 6, 2**30)]:
        add(f"v0_{name}", v0[:4 * idx] + struct.pack("<i", value) + v0[4 * idx + 4:], files["tok"])
    return cases


def test_garbage_cli(garbage):
    sweep(RUN, garbage)


def test_garbage_python(garbage):
    assert_python_errors(garbage, python_open(garbage))


# ----------------------------------------------------------------------------------------------
# absurd values in a kvc header

NAN = float("nan")
BIG = 2**31 - 1
HEADER_CASES = {
    "version0": dict(version=0), "version1": dict(version=1), "version3": dict(version=3),
    "version_max": dict(version=2**32 - 1),
    "dim0": dict(dim=0), "dim_neg": dict(dim=-32), "dim_huge": dict(dim=BIG), "dim_64": dict(dim=64),
    "hidden0": dict(hidden_dim=0), "hidden_neg": dict(hidden_dim=-1), "hidden_huge": dict(hidden_dim=BIG),
    "layers0": dict(n_layers=0), "layers_neg": dict(n_layers=-2), "layers_huge": dict(n_layers=BIG),
    "layers_3": dict(n_layers=3),
    "heads0": dict(n_heads=0), "heads_neg": dict(n_heads=-4), "heads_huge": dict(n_heads=BIG),
    "kv0": dict(n_kv_heads=0), "kv_neg": dict(n_kv_heads=-2), "kv_huge": dict(n_kv_heads=BIG),
    "heads_not_multiple": dict(n_heads=3, n_kv_heads=2), "kv_more_than_heads": dict(n_kv_heads=8),
    "head_dim0": dict(head_dim=0), "head_dim_odd": dict(head_dim=7), "head_dim_neg": dict(head_dim=-8),
    "head_dim_huge": dict(head_dim=BIG), "head_dim_16": dict(head_dim=16),
    "vocab0": dict(vocab_size=0), "vocab_neg": dict(vocab_size=-300), "vocab_huge": dict(vocab_size=BIG),
    "vocab_299": dict(vocab_size=299),
    "seq0": dict(seq_len=0), "seq_neg": dict(seq_len=-1), "seq_huge": dict(seq_len=BIG),
    "theta_nan": dict(rope_theta=NAN), "theta_neg": dict(rope_theta=-10000.0), "theta0": dict(rope_theta=0.0),
    "theta_inf": dict(rope_theta=math.inf),
    "eps_nan": dict(norm_eps=NAN), "eps_neg": dict(norm_eps=-1e-5), "eps0": dict(norm_eps=0.0),
    "eps_inf": dict(norm_eps=math.inf),
    "unshared_without_wcls": dict(shared_classifier=0),
    "wtype4": dict(type_wq=4), "wtype_neg": dict(type_w1=-1), "wtype_max": dict(type_tok_embeddings=2**31 - 1),
    "wtype_q8_gs0": dict(type_wq=1), "wtype_q8_gs7": dict(type_wq=1, group_size=7),
    "wtype_q8_gs_neg": dict(type_wq=1, group_size=-16), "wtype_q8_gs_huge": dict(type_wq=1, group_size=2**20),
    "wtype_q8_gs16_f32_data": dict(type_wq=1, group_size=16), "wtype_q4_0_f32_data": dict(type_w2=2),
    "wtype_q4_1_f32_data": dict(type_wo=3), "gs_without_q8": dict(group_size=32),
    "q8_gs16_beside_q4": dict(type_wq=1, type_wk=2, group_size=16),
    "shared_classifier_type": dict(type_wcls=1), "unshared_wcls_type": dict(shared_classifier=0, type_wcls=7),
    "bos_eq_vocab": dict(bos_id=300), "bos_neg2": dict(bos_id=-2), "bos_huge": dict(bos_id=BIG),
    "eos_eq_vocab": dict(eos_id=300), "eos_neg2": dict(eos_id=-2), "eos_intmin": dict(eos_id=-2**31),
    "tok_off_past_end": dict(tokenizer_offset=10**7), "tok_size_past_end": dict(tokenizer_size=10**7),
    "tok_off_2_63": dict(tokenizer_offset=2**63), "tok_size_2_63": dict(tokenizer_size=2**63),
    "tok_size_max": dict(tokenizer_size=2**64 - 1), "tok_wrap": dict(tokenizer_offset=2**64 - 64, tokenizer_size=128),
    "tok_size_short": dict(tokenizer_size=100), "tok_off_into_template": dict(tokenizer_offset=300),
    "tmpl_off_past_end": dict(template_offset=10**7), "tmpl_off_2_63": dict(template_offset=2**63),
    "tmpl_size_2_63": dict(template_size=2**63), "tmpl_size_max": dict(template_size=2**64 - 1),
    "tmpl_wrap": dict(template_offset=2**64 - 8, template_size=16), "tmpl_size0": dict(template_size=0),
    "tmpl_size3": dict(template_size=3),
    "w_off_past_end": dict(weights_offset=10**7), "w_off_2_63": dict(weights_offset=2**63),
    "w_size_2_63": dict(weights_size=2**63), "w_size_max": dict(weights_size=2**64 - 1),
    "w_wrap": dict(weights_offset=2**64 - 64, weights_size=128), "w_size0": dict(weights_size=0),
    "w_size_minus64": "weights_size-64", "w_size_plus64": "weights_size+64", "w_off_minus64": "weights_offset-64",
    "w_off_misaligned": "weights_offset+4",
}


@pytest.fixture(scope="module")
def header_cases(files, tmp_path_factory) -> list[tuple[str, Path, Path | None]]:
    d = tmp_path_factory.mktemp("header")
    h = header(files["kvc"])
    cases = []
    for name, change in HEADER_CASES.items():
        if isinstance(change, str):  # "field+delta"
            field, sign, delta = change.partition("+") if "+" in change else change.partition("-")
            change = {field: h[field] + int(delta) * (1 if sign == "+" else -1)}
            if field == "weights_offset":
                change["weights_size"] = h["weights_size"] - (change[field] - h[field])
        cases.append((name, patched(files["kvc"], d / f"{name}.bin", **change), None))
    return cases


def test_header_cli(header_cases):
    sweep(RUN, header_cases)


def test_header_python(header_cases):
    assert_python_errors(header_cases, python_open(header_cases))


def test_header_messages(header_cases):
    """The message names what is wrong."""
    by_name = {n: p for n, p, _ in header_cases}
    expect = {"version1": "version", "dim0": "dim", "heads_not_multiple": "multiple", "head_dim_odd": "head_dim",
              "theta_nan": "rope_theta", "eps_neg": "norm_eps", "wtype4": "weight type", "bos_eq_vocab": "bos",
              "wtype_q8_gs7": "group_size", "gs_without_q8": "group_size", "q8_gs16_beside_q4": "mixed",
              "shared_classifier_type": "classifier", "wtype_q4_0_f32_data": "weights",
              "tok_off_2_63": "tokenizer", "w_size_max": "weights", "tmpl_off_2_63": "chat template",
              "seq_huge": "seq_len", "w_off_misaligned": "aligned"}
    for name, word in expect.items():
        err = assert_error(run_cli(by_name[name], "-n", "1", "-i", "hi"))
        assert word in err, (name, err)


def test_q4_types_the_data_does_not_fit(files, tmp_path):
    """A q4 type on rows that are not whole blocks of 32, or on data of another type (the weights
    section's size then disagrees), or a short section: one line naming the problem from ./run, and
    ValueError from kvc.Model and from the Python reader."""
    odd = tmp_path / "rows48.bin"
    write_random_model(odd, dim=48, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=16)
    size = header(files["q4"])["weights_size"]
    cases = {
        "rows_not_blocks": (odd, dict(type_wq=fmt.Q4_0), "blocks of 32"),
        "q4_1_as_q4_0": (files["q4"], dict(type_w1=fmt.Q4_0), "weights"),
        "q4_0_as_q4_1": (files["q4"], dict(type_wq=fmt.Q4_1), "weights"),
        "q4_1_as_q8_0": (files["q4"], dict(type_w3=fmt.Q8_0), "weights"),
        "q4_section_short": (files["q4"], dict(weights_size=size - 64), "weights"),
        "q4_section_long": (files["q4"], dict(weights_size=size + 64), "weights"),
    }
    for name, (src, change, word) in cases.items():
        path = patched(src, tmp_path / f"{name}.bin", **change)
        assert word in assert_error(run_cli(path, "-n", "1", "-i", "hi")), name
        with pytest.raises(ValueError, match=word):
            Model(path)
        with pytest.raises(ValueError):
            fmt.read_model(path)


def test_weights_section_over_header(files, tmp_path):
    """weights_offset 0 (size unchanged) reads the header and tokenizer as weights: must be refused."""
    p = patched(files["kvc"], tmp_path / "w0.bin", weights_offset=0)
    assert_error(run_cli(p, "-n", "1", "-i", "hi"))


def test_tokenizer_section_missing(files, tmp_path):
    """tokenizer_size 0: a model without a tokenizer. It opens, but text needs one."""
    p = patched(files["kvc"], tmp_path / "notok.bin", tokenizer_size=0)
    assert "tokenizer" in assert_error(run_cli(p, "-n", "1", "-i", "hi"))
    m = Model(p)
    assert not m.has_tokenizer
    assert m.forward([1, 2]).shape == (2, CFG["vocab_size"])
    with pytest.raises(ValueError, match="tokenizer"):
        m.encode("hi")
    with pytest.raises(ValueError, match="tokenizer"):
        list(m.generate("hi", max_tokens=2))
    # a tokenizer.bin supplies it
    proc = run_cli(p, "-z", files["tok"], "-n", "2", "-t", "0", "-i", "hi")
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------
# corrupt tokenizer and chat template sections


def _token_record_offsets(path: Path) -> list[int]:
    """File offset of each token record (score, type, length) in a kvc file's tokenizer section."""
    data = path.read_bytes()
    h = header(path)
    off = h["tokenizer_offset"]
    n = struct.unpack_from("<I", data, off + 4)[0]
    off += fmt.TOKENIZER_HEADER.size
    offs = []
    for _ in range(n):
        offs.append(off)
        off += 12 + struct.unpack_from("<I", data, off + 8)[0]
    return offs


@pytest.fixture(scope="module")
def section_cases(files, tmp_path_factory) -> list[tuple[str, Path, Path | None]]:
    d = tmp_path_factory.mktemp("sections")
    cases = []

    def add(name, src, **kw):
        cases.append((name, patched(files[src], d / f"{name}.bin", **kw), None))

    u32 = lambda v: struct.pack("<I", v % 2**32)
    for src in ("kvc", "bpe"):
        h = header(files[src])
        t0 = h["tokenizer_offset"]
        recs = _token_record_offsets(files[src])
        add(f"{src}_kind0", src, at=t0, data=u32(0))
        add(f"{src}_kind3", src, at=t0, data=u32(3))
        add(f"{src}_kind_max", src, at=t0, data=u32(-1))
        for n in (0, 299, 301, 2**31, 2**32 - 1):
            add(f"{src}_n_tokens_{n}", src, at=t0 + 4, data=u32(n))
        add(f"{src}_pretok4", src, at=t0 + 12, data=u32(4))
        add(f"{src}_pretok_max", src, at=t0 + 12, data=u32(-1))
        add(f"{src}_unk_eq_vocab", src, at=t0 + 16, data=u32(301))
        add(f"{src}_unk_neg2", src, at=t0 + 16, data=u32(-1))
        add(f"{src}_merges_huge", src, at=t0 + 20, data=u32(2**24 + 1))
        add(f"{src}_merges_max", src, at=t0 + 20, data=u32(-1))
        add(f"{src}_merges_past_section", src, at=t0 + 20, data=u32(1000))
        for i in (0, 5, len(recs) - 1):
            add(f"{src}_tok{i}_len_huge", src, at=recs[i] + 8, data=u32(-1))
            add(f"{src}_tok{i}_len_2000", src, at=recs[i] + 8, data=u32(2000))
            add(f"{src}_tok{i}_len_1024", src, at=recs[i] + 8, data=u32(1024))  # allowed size, past the end
            add(f"{src}_tok{i}_len_2_31", src, at=recs[i] + 8, data=u32(2**31))
            for typ in (0, 7, 2**32 - 1):
                add(f"{src}_tok{i}_type{typ}", src, at=recs[i] + 4, data=u32(typ))
        add(f"{src}_filler_as_byte_token", src, at=recs[-1] + 4, data=u32(fmt.BYTE))
        # the chat template section
        c0 = h["template_offset"]
        add(f"{src}_chat_style9", src, at=c0, data=u32(9))
        add(f"{src}_chat_style_max", src, at=c0, data=u32(-1))
        add(f"{src}_chat_eot_vocab", src, at=c0 + 4, data=u32(300))
        add(f"{src}_chat_eot_neg2", src, at=c0 + 4, data=u32(-2))
        add(f"{src}_chat_system_len_huge", src, at=c0 + 8, data=u32(-1))
        add(f"{src}_chat_system_len_2_31", src, at=c0 + 8, data=u32(2**31))
    # byte-level BPE merges: ids out of range, or a merge whose result is not in the vocab
    h = header(files["bpe"])
    m0 = h["tokenizer_offset"] + h["tokenizer_size"] - 8 * len(bpe_tokenizer(300).merges)
    for name, pair in [("left_vocab", (300, 3)), ("right_vocab", (3, 300)), ("left_max", (2**32 - 1, 3)),
                       ("right_neg", (3, -1)), ("both_huge", (2**31, 2**31)), ("no_result", (3, 4))]:
        add(f"bpe_merge_{name}", "bpe", at=m0, data=u32(pair[0]) + u32(pair[1]))
        add(f"bpe_last_merge_{name}", "bpe", at=m0 + 8 * 5, data=u32(pair[0]) + u32(pair[1]))
    return cases


def test_sections_cli(section_cases):
    sweep(RUN, section_cases)


def test_sections_python(section_cases):
    assert_python_errors(section_cases, python_open(section_cases))


def test_tokenizer_count_mismatch_message(files, tmp_path):
    """A tokenizer section whose n_tokens is not the model's vocab says so."""
    t0 = header(files["kvc"])["tokenizer_offset"]
    p = patched(files["kvc"], tmp_path / "n.bin", at=t0 + 4, data=struct.pack("<I", 299))
    err = assert_error(run_cli(p, "-n", "1", "-i", "hi"))
    assert "299" in err and "300" in err, err
    with pytest.raises(ValueError, match="299"):
        Model(p)


# ----------------------------------------------------------------------------------------------
# tokenizer.bin that does not fit the model


@pytest.fixture(scope="module")
def tokenizer_cases(files, tmp_path_factory) -> list[tuple[str, Path, Path | None]]:
    d = tmp_path_factory.mktemp("tokenizer_bin")
    tok = byte_tokenizer(CFG["vocab_size"])
    more = byte_tokenizer(CFG["vocab_size"] + 20)
    cases = []
    data = files["tok"].read_bytes()

    def add(name, model, write):
        p = d / f"{name}.tok"
        write(p)
        cases.append((name, files[model], p))

    for model in ("v0", "v1", "kvc"):
        add(f"{model}_fewer_tokens", model, lambda p: write_tokenizer_bin(p, tok.pieces[:250], tok.scores[:250]))
        add(f"{model}_one_token_short", model, lambda p: write_tokenizer_bin(p, tok.pieces[:299], tok.scores[:299]))
        add(f"{model}_more_tokens", model, lambda p: write_tokenizer_bin(p, more.pieces, more.scores))
        add(f"{model}_trailing_byte", model, lambda p: write_tokenizer_bin(p, tok.pieces, tok.scores, b"\0"))
        record = struct.pack("<fI", 0, 1) + b"x"
        add(f"{model}_trailing_record", model, lambda p: write_tokenizer_bin(p, tok.pieces, tok.scores, record))
        for cut in (1, 3, 4, 5, 8, len(data) // 2, len(data) - 1):
            add(f"{model}_cut{cut}", model, lambda p, cut=cut: p.write_bytes(data[:cut]))
        add(f"{model}_len_huge", model, lambda p: p.write_bytes(data[:8] + struct.pack("<I", 2**32 - 1) + data[12:]))
        add(f"{model}_len_2_31", model, lambda p: p.write_bytes(data[:8] + struct.pack("<I", 2**31) + data[12:]))
        add(f"{model}_len_past_end", model, lambda p: p.write_bytes(data[:8] + struct.pack("<I", len(data)) + data[12:]))
    return cases


def test_tokenizer_bin_mismatch_cli(tokenizer_cases):
    sweep(RUN, tokenizer_cases)


def test_tokenizer_bin_mismatch_python(tokenizer_cases):
    assert_python_errors(tokenizer_cases, python_open(tokenizer_cases))


# ----------------------------------------------------------------------------------------------
# the same sweeps under AddressSanitizer + UBSan


@pytest.fixture(scope="module")
def run_asan() -> Path:
    proc = subprocess.run(["make", "asan"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert RUN_ASAN.exists()
    return RUN_ASAN


def test_asan_good_file_is_clean(run_asan, files):
    """The sanitized build runs a good model without a report (else every sweep below is moot)."""
    for key in ("kvc", "bpe", "q8"):
        proc = run_cli(files[key], "-n", "4", "-t", "0.8", "-s", "3", "-i", "the thin", exe=run_asan, env=SANITIZER_ENV)
        err = proc.stderr.decode()
        assert proc.returncode == 0 and "Sanitizer" not in err and "runtime error" not in err, err
    proc = run_cli(files["v0"], "-z", files["tok"], "-n", "4", "-i", "hi", exe=run_asan, env=SANITIZER_ENV)
    assert proc.returncode == 0, proc.stderr


def test_asan_truncated(run_asan, truncated):
    sweep(run_asan, truncated, env=SANITIZER_ENV)


def test_asan_garbage(run_asan, garbage):
    sweep(run_asan, garbage, env=SANITIZER_ENV)


def test_asan_header(run_asan, header_cases):
    sweep(run_asan, header_cases, env=SANITIZER_ENV)


def test_asan_sections(run_asan, section_cases):
    sweep(run_asan, section_cases, env=SANITIZER_ENV)


def test_asan_tokenizer_bin(run_asan, tokenizer_cases):
    sweep(run_asan, tokenizer_cases, env=SANITIZER_ENV)


def test_asan_cli_misuse(run_asan, files, tmp_path):
    assert_error(run_cli(tmp_path / "nope.bin", exe=run_asan, env=SANITIZER_ENV))
    assert_error(run_cli(tmp_path, exe=run_asan, env=SANITIZER_ENV))
    assert_error(run_cli(files["kvc"], "-c", "8", "-i", "a long prompt " * 10, exe=run_asan, env=SANITIZER_ENV))
    assert_error(run_cli(files["kvc"], "-m", "chat", exe=run_asan, env=SANITIZER_ENV))


# ----------------------------------------------------------------------------------------------
# Python misuse


@pytest.fixture
def model(files):
    with Model(files["kvc"]) as m:
        yield m


def test_forward_outside_context(model):
    T = CFG["seq_len"]
    model.forward([1, 2, 3], pos=T - 3)  # the last three positions are fine
    for tokens, pos in [([1], T), ([1, 2], T - 1), ([1], T + 100), ([1], -1), (list(range(T + 1)), 0)]:
        with pytest.raises(IndexError):
            model.forward(tokens, pos=pos)


def test_forward_bad_token_ids(model):
    for tokens in ([300], [-1], [1, 2, 300], [2**31 - 1], [-2**31]):
        with pytest.raises(ValueError):
            model.forward(tokens)
    assert model.forward([299, 0]).shape == (2, 300)


def test_closed_model(files):
    m = Model(files["kvc"])
    m.close()
    m.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        m.forward([1])
    with pytest.raises(ValueError, match="closed"):
        m.encode("hi")
    with pytest.raises(ValueError, match="closed"):
        list(m.generate("hi", max_tokens=2))
    with pytest.raises(ValueError, match="closed"):
        m.kv_cache


def test_encode_nul(model):
    with pytest.raises(ValueError, match="NUL"):
        model.encode("a\0b")
    with pytest.raises(ValueError):
        list(model.generate("a\0b", max_tokens=1))


def test_seq_len_and_threads(files):
    for bad in (0, -1):
        with pytest.raises(ValueError):
            Model(files["kvc"], seq_len=bad)
        with pytest.raises(ValueError):
            Model(files["kvc"], threads=bad)
    with pytest.raises(ValueError, match="context"):
        Model(files["kvc"], seq_len=CFG["seq_len"] + 1)
    m = Model(files["kvc"], seq_len=8)
    assert m.config.seq_len == 8
    with pytest.raises(IndexError):
        m.forward([1] * 9)


def test_generate_prompt_too_long(model, files):
    prompt = "x" * (CFG["seq_len"] + 5)
    assert len(model.encode(prompt)) > CFG["seq_len"]
    with pytest.raises(ValueError, match="context"):
        list(model.generate(prompt, max_tokens=2, temperature=0))
    with pytest.raises(ValueError):
        list(model.generate("hi", max_tokens=-1))
    # the model is still usable afterwards
    out = "".join(model.generate("hi", max_tokens=3, temperature=0))
    assert model.stats.generated_tokens <= 3 and isinstance(out, str)


def test_chat_without_template(model, files):
    with pytest.raises(ValueError, match="template"):
        list(model.chat([{"role": "user", "content": "hi"}], max_tokens=2))
    m = Model(files["bpe"])  # with one it works, and bad messages are refused
    list(m.chat([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0))
    assert m.stats.prompt_tokens > 0
    for bad in ([{"role": "user"}], [{"role": 1, "content": "x"}], ["hi"], [{"role": "user", "content": "a\0"}]):
        with pytest.raises(ValueError):
            m.chat_tokens(bad)


def test_sampler_arguments(model):
    for kw in (dict(temperature=-1.0), dict(temperature=math.nan), dict(top_p=1.5), dict(top_p=-0.1),
               dict(top_k=-1)):
        with pytest.raises(ValueError):
            list(model.generate("hi", max_tokens=2, **kw))


# ----------------------------------------------------------------------------------------------
# CLI: the prompt and -n against the context


def test_cli_prompt_longer_than_context(files):
    err = assert_error(run_cli(files["kvc"], "-c", "8", "-n", "4", "-i", "a long prompt " * 10))
    assert "context" in err
    err = assert_error(run_cli(files["kvc"], "-i", "x" * (CFG["seq_len"] + 1)))
    assert "context" in err
    assert_error(run_cli(files["kvc"], "-c", str(CFG["seq_len"] + 1), "-i", "hi"))  # -c beyond the model


def test_cli_n_beyond_context_clamps(files):
    proc = run_cli(files["kvc"], "-c", "16", "-n", "1000", "-t", "0", "-i", "hi")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "note:" in err and "1000" in err, err
    m = Model(files["kvc"], seq_len=16)
    n_prompt = len(m.encode("hi"))
    room = 16 - n_prompt + 1  # every position holds a token; the last one sampled needs no slot
    list(m.generate("hi", max_tokens=room, temperature=0))
    expected = m.stats.generated_tokens  # fewer than room only if greedy reaches EOS
    stats = [l for l in err.splitlines() if l.startswith("prompt ")]
    assert stats == [stats[0]] and f"prompt {n_prompt} tokens" in stats[0]
    generated = int(stats[0].split("generated ")[1].split()[0])
    assert generated <= room
    assert generated == expected


# ----------------------------------------------------------------------------------------------
# The hardening audit's reproducers (each failed before its fix)


def nan_model(files, tmp_path) -> Path:
    """files["kvc"] with rms_final (the weights section's last tensor) patched to NaN in place."""
    data = bytearray(files["kvc"].read_bytes())
    h = header(files["kvc"])
    end = h["weights_offset"] + h["weights_size"]
    data[end - 4 * CFG["dim"]:end] = np.full(CFG["dim"], np.nan, np.float32).tobytes()
    path = tmp_path / "nan.bin"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("sampling", [["-t", "1", "-p", "0.9"], ["-t", "1", "-p", "1"], ["-t", "1", "-k", "5"],
                                      ["-t", "0"]])
def test_nan_logits_are_an_error(files, tmp_path, run_asan, sampling):
    """NaN weights give NaN logits: a one-line error, not c[-1] read by the top-p sampler nor token 0."""
    path = nan_model(files, tmp_path)
    for exe, env in ((RUN, None), (run_asan, SANITIZER_ENV)):
        err = assert_error(run_cli(path, "-n", "4", "-s", "1", *sampling, "-i", "hi", exe=exe, env=env))
        assert "NaN" in err
    with pytest.raises(ValueError, match="NaN"):
        list(Model(path).generate("hi", max_tokens=4, temperature=1.0, top_p=0.9, seed=1))


def test_top_p_below_one_over_vocab(files, run_asan):
    """temperature 1e30 makes the probabilities uniform, top-p 0.001 then keeps no token above the
    cutoff: the most probable token is kept (the lowest id among equals), with no out-of-bounds read."""
    proc = run_cli(files["kvc"], "-n", "4", "-t", "1e30", "-p", "0.001", "-s", "1", "-i", "hi", exe=run_asan,
                   env=SANITIZER_ENV)
    assert proc.returncode == 0, proc.stderr.decode()
    m = Model(files["kvc"])
    out = list(m.generate("hi", max_tokens=4, temperature=1e30, top_p=0.001, seed=1))
    assert m.stats.generated_tokens + (m.stats.stop_reason == "stop") == 4 and isinstance("".join(out), str)


def test_tokenizer_header_values_are_checked_unsigned(files, tmp_path, run_asan):
    """Header integers past INT32_MAX: (int)h[4] - 1 with h[4] = 0x80000000 was a signed overflow."""
    t0 = header(files["kvc"])["tokenizer_offset"]
    first_type = t0 + fmt.TOKENIZER_HEADER.size + 4  # the first token record's type
    cases = [(name, patched(files["kvc"], tmp_path / f"{name}.bin", at, struct.pack("<I", value)), None)
             for name, at, value in [("unk_2_31", t0 + 16, 0x80000000), ("unk_max", t0 + 16, 0xFFFFFFFF),
                                     ("kind_2_31", t0, 0x80000000), ("pretok_2_31", t0 + 12, 0x80000000),
                                     ("flags_unknown", t0 + 8, 1 << 31), ("type_2_31", first_type, 0x80000000)]]
    sweep(RUN, cases)
    sweep(run_asan, cases, env=SANITIZER_ENV)
    assert_python_errors(cases, python_open(cases))


def test_tokenizer_bin_must_be_a_regular_file(files, tmp_path):
    """-z a directory asked malloc for LONG_MAX bytes; -z a FIFO blocked forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for tok in (tmp_path, fifo):
        err = assert_error(run_cli(files["v0"], "-z", tok, "-n", "2", "-i", "hi", timeout=10))
        assert "not a regular file" in err
        with pytest.raises(ValueError, match="not a regular file"):
            Model(files["v0"], tokenizer=tok)
    err = assert_error(run_cli(fifo, "-n", "2", "-i", "hi", timeout=10))  # and the checkpoint
    assert "not a regular file" in err


def test_thread_count_is_bounded(files):
    """threads=100000 overflowed the OpenMP runtime's stack (SIGSEGV); the bound is 512."""
    code = f"import kvc\ntry:\n kvc.Model({str(files['kvc'])!r}, threads=100000).forward([1])\nexcept ValueError as e:\n print(e)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and "threads must be 1..512" in proc.stdout, proc.stderr
    bad = run_cli(files["kvc"], "-j", "513", "-i", "hi")  # a bad flag: its error, then the usage
    assert bad.returncode == 1 and bad.stderr.decode().startswith("error: bad value for -j")
    assert run_cli(files["kvc"], "-j", "512", "-n", "2", "-i", "hi", threads=512).returncode == 0


def test_a_cache_larger_than_memory_is_refused(tmp_path, run_asan):
    """A 4 MB file whose header asks for a 512 GiB KV cache: a one-line error naming -c, before
    anything is allocated (ASan's allocator aborted on the request)."""
    path = tmp_path / "huge_context.bin"
    write_random_model(path, dim=16, hidden_dim=16, n_layers=4, n_heads=1, n_kv_heads=1, head_dim=4096,
                       seq_len=1 << 22)
    assert path.stat().st_size < 5 << 20
    for exe, env in ((RUN, None), (run_asan, SANITIZER_ENV)):
        err = assert_error(run_cli(path, "-n", "2", "-i", "hi", exe=exe, env=env))
        assert "-c" in err and "GiB" in err
        assert run_cli(path, "-c", "64", "-n", "2", "-i", "hi", exe=exe, env=env).returncode == 0
    with pytest.raises(ValueError, match="seq_len="):
        Model(path)
    assert Model(path, seq_len=64).config.seq_len == 64


def test_checkpoint_truncated_while_running(tmp_path):
    """Truncating the mapped checkpoint mid-generation raised SIGBUS; now one line and exit 1."""
    path = tmp_path / "big.bin"
    write_random_model(path, dim=256, hidden_dim=768, n_layers=4, n_heads=4, n_kv_heads=4, seq_len=4096)
    proc = subprocess.Popen([str(RUN), str(path), "-n", "0", "-t", "1", "-s", "1", "-j", "1", "-i", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(16)  # generating: the weights are mapped and being read
    os.truncate(path, 0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err.decode()
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "overwritten" in lines[0]
