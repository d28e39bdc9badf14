"""The CUDA backend (cuda.cu behind backend.h) against the torch reference and the CPU engine.

Every test runs on device="cuda-sim": cuda.cu built by the host compiler against cuda_sim.h, which
runs each kernel's blocks and threads on the CPU (`make cuda-sim`, built here when missing). Where
nvidia-smi shows a GPU the same tests run on device="cuda" too (`make cuda`); elsewhere those are
skipped, with the reason. The simulation is checked to catch what it claims to: an out-of-bounds read
under ASan, a shared-memory race under TSan, a barrier not every thread reaches.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kvc
from kvc import format as fmt
from kvc._lib import ffi, load
from kvc.reference import Llama
from helpers import ROOT, decode_from_nan, mean_kl, random_tokens, run_cli, write_random_model

TOL = 1e-4  # the CPU engine's bound against the reference (tests/test_engine.py)
BUILD_TIMEOUT = 300  # seconds: make cuda-sim / make cuda
CONFIGS = [
    ("mha", dict(n_heads=4, n_kv_heads=4)),
    ("gqa", dict(n_heads=8, n_kv_heads=2)),
    ("mqa", dict(n_heads=4, n_kv_heads=1)),
    ("untied", dict(n_heads=4, n_kv_heads=2, shared_classifier=False)),
    ("head_dim16", dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=1e5)),  # q_dim 64 != dim
]


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


def gpu_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.returncode == 0 and "GPU" in out.stdout


def make(*targets: str) -> None:
    out = subprocess.run(["make", *targets], cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert out.returncode == 0, f"make {' '.join(targets)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="session", params=["cuda-sim", "cuda"])
def device(request) -> str:
    if request.param == "cuda":
        if not gpu_present():
            pytest.skip("no GPU here (nvidia-smi shows none): the cuda-sim runs of these tests stand for it")
        make("cuda")
    else:
        make("cuda-sim")
    return request.param


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def model_path(request, tmp_path_factory) -> Path:
    name, overrides = request.param
    path = tmp_path_factory.mktemp(name) / "model.bin"
    write_random_model(path, seed=len(name), **overrides)
    return path


# ----------------------------------------------------------------------------------------------
# f32 weights, f32 cache: the reference's logits, exactly cached decode, the CPU build's tokens


def test_logits_match_reference_at_every_position(device, model_path):
    model = kvc.Model(model_path, device=device)
    tokens = random_tokens(150, seed=1, vocab=model.config.vocab_size)  # three chunks of the device's 64 tokens: tiled kernels
    got = model.forward(tokens, 0)
    want = Llama.load(model_path).forward_full(tokens)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 1.0  # not trivially small


def test_cached_decode_equals_recomputation_and_reads_nothing_unwritten(device, tmp_path):
    """Token-by-token decode (the matrix-vector kernels, attention split in ranges of 128 positions
    and merged) equals recomputing everything; the cache starts as NaN, so a stray read would show."""
    path = tmp_path / "m.bin"
    write_random_model(path, n_heads=4, n_kv_heads=2, seq_len=320)
    model = kvc.Model(path, device=device)
    tokens = random_tokens(280, seed=2)
    got, _, _ = decode_from_nan(model, tokens, 250)
    assert np.isfinite(got).all()
    assert np.abs(got - Llama.load(path).forward_full(tokens)).max() <= TOL


def test_kv_cache_equals_cpu_cache(device, model_path):
    tokens = random_tokens(70, seed=5)
    gpu, cpu = kvc.Model(model_path, device=device), kvc.Model(model_path, threads=1)
    gpu.forward(tokens)
    cpu.forward(tokens)
    for got, want in zip(gpu.kv_cache, cpu.kv_cache):
        assert got.shape == want.shape
        assert np.abs(got[:, :70] - want[:, :70]).max() <= TOL
        assert not got[:, 70:].any()  # a new sequence's cache is zero


def test_greedy_tokens_equal_cpu_build(device, model_path):
    start = random_tokens(8, seed=4)
    runs = []
    for model in (kvc.Model(model_path, device=device), kvc.Model(model_path, threads=1)):
        logits, out = model.forward(start, 0), []
        for pos in range(len(start), len(start) + 40):
            out.append(int(np.argmax(logits[-1])))
            logits = model.forward([out[-1]], pos)
        runs.append(out)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 3  # the random model does not just repeat one token


def test_rewriting_a_position_replaces_its_cache_row(device, tmp_path):
    path = tmp_path / "m.bin"
    write_random_model(path, n_heads=4, n_kv_heads=2)
    model = kvc.Model(path, device=device)
    a = random_tokens(30, seed=6)
    b = a[:20] + random_tokens(10, seed=7)
    model.forward(a, 0)
    got = model.forward(b[20:], 20)
    assert np.abs(got - Llama.load(path).forward_full(b)[20:]).max() <= TOL


# ----------------------------------------------------------------------------------------------
# Q8_0 weights: run.c's int8 activations, within the CPU tests' bounds


@pytest.mark.parametrize("gs", [32, 64])
def test_q8_weights_within_the_cpu_bounds(device, tmp_path, gs):
    """tests/test_quantized.py's bounds against the float reference, and tests/test_q4.py's against
    the reference that rounds each matmul input to int8 as run.c does (read over this cache)."""
    path = tmp_path / "q8.bin"
    write_random_model(path, 0, weight_type=fmt.Q8_0, group_size=gs, hidden_dim=192, n_heads=4, n_kv_heads=2, seq_len=160)
    model = kvc.Model(path, device=device)
    tokens = random_tokens(100, seed=8)
    got, keys, values = decode_from_nan(model, tokens, 80)
    ref = Llama.load(path).forward_full(tokens)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert mean_kl(ref, got) <= 0.01
    int8 = Llama(fmt.read_model(path), int8_inputs=True).forward_reading(tokens, keys, values)
    d = np.abs(got - int8).max(-1)
    assert (d <= 2e-5).mean() >= 0.9 and d.max() <= 0.25, np.sort(d)[-5:]
    cpu = kvc.Model(path, threads=1).forward(tokens)
    assert (got.argmax(-1) == cpu.argmax(-1)).mean() >= 0.95


# ----------------------------------------------------------------------------------------------
# f16 and q8_0 caches: the same bytes as run.c's, attention reading exactly them

CACHE_COMBOS = [("f16", "f16"), ("q8_0", "q8_0"), ("f32", "q8_0"), ("q8_0", "f16")]


@pytest.fixture(scope="module")
def cache_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "m.bin"
    write_random_model(path, seed=4, n_heads=4, n_kv_heads=2, head_dim=32, dim=128)  # head_dim: one q8_0 block
    return path


@pytest.mark.parametrize("type_k,type_v", CACHE_COMBOS, ids=[f"{k}-{v}" for k, v in CACHE_COMBOS])
def test_cache_types_read_exactly_what_the_cache_holds(device, cache_model, type_k, type_v):
    """As tests/test_cache_types.py states it for the CPU: the logits at every position (a prefill,
    then token by token past the split threshold) equal the reference attending over the device
    cache's own contents; unwritten slots stay NaN; the stored rows are the type's rounding of the
    reference's keys and values, and equal the CPU cache's up to one step of the type."""
    model = kvc.Model(cache_model, cache_type_k=type_k, cache_type_v=type_v, device=device)
    tokens = random_tokens(150, seed=3)
    logits, keys, values = decode_from_nan(model, tokens, 90)
    ref = Llama.load(cache_model, cache_type_k=type_k, cache_type_v=type_v)
    error = np.abs(logits - ref.forward_reading(tokens, keys, values)).max(-1)
    if type_k == "q8_0":  # an int8 query value within float rounding of a tie can round the other way
        assert (error <= TOL).mean() >= 0.95 and error.max() <= 0.05, np.sort(error)[-10:]
    else:
        assert error.max() <= TOL
    typed, raw = Llama.load(cache_model, cache_type_k=type_k, cache_type_v=type_v), Llama.load(cache_model)
    typed.forward(tokens, 0)
    raw.forward(tokens, 0)
    cpu = kvc.Model(cache_model, cache_type_k=type_k, cache_type_v=type_v, threads=1)
    cpu.forward(tokens)
    sides = zip((type_k, type_v), (keys, values), (typed.k_cache, typed.v_cache), (raw.k_cache, raw.v_cache), cpu.kv_cache)
    for kind, got, want, exact, on_cpu in sides:
        want, exact = want[:, :150].numpy(), exact[:, :150].numpy()
        rounding = np.abs(want - exact).max()  # the type's own error (0 for f32)
        assert np.abs(got[:, :150] - want).max() <= 2.5 * rounding + TOL
        assert np.abs(got[:, :150] - on_cpu[:, :150]).max() <= rounding + TOL
        if kind != "f32":  # float rounding apart, the same rows store as the very same values
            assert rounding > 0 and (got[:, :150] == on_cpu[:, :150]).mean() >= 0.9


def test_memory_counts_the_device_cache(device, cache_model):
    cpu = kvc.Model(cache_model, cache_type_k="q8_0", cache_type_v="f16", threads=1).memory()
    gpu = kvc.Model(cache_model, cache_type_k="q8_0", cache_type_v="f16", device=device).memory()
    assert gpu["kv_cache"] == cpu["kv_cache"] > 0  # the same bytes a row as run.c's cache
    assert gpu["scratch"] > 0


# ----------------------------------------------------------------------------------------------
# What the device refuses, with one line


def test_device_refuses_what_it_lacks(device, cache_model, tmp_path):
    for kw, message in [(dict(cache_type_k="q4_0"), "no q4_0 KV cache"), (dict(cache_type_v="iq4_nl"), "no iq4_nl KV cache"),
                        (dict(cache_type_k="q8_0", cache_rotate=True), "no rotated")]:
        with pytest.raises(ValueError, match=message):
            kvc.Model(cache_model, device=device, **kw)
    q4 = tmp_path / "q4.bin"
    write_random_model(q4, weight_type=fmt.Q4_0)
    with pytest.raises(ValueError, match="no q4_0 weights"):
        kvc.Model(q4, device=device)
    with pytest.raises(ValueError, match="unknown device"):
        kvc.Model(cache_model, device="tpu")
    other = "cuda" if device == "cuda-sim" else "cuda-sim"
    lib, m = load(device), None
    try:
        m = lib.kvc_open(str(cache_model).encode(), ffi.NULL)
        assert lib.kvc_sequence_new_on(m, other.encode(), 0, 0, 0, 0, 0) == ffi.NULL
        assert f"unknown device {other}" in ffi.string(lib.kvc_last_error()).decode()
    finally:
        lib.kvc_close(m)
    model = kvc.Model(cache_model, device=device)
    with pytest.raises(IndexError):
        model.forward([1] * 5, model.config.seq_len - 2)
    with pytest.raises(ValueError):
        model.forward([300], 0)


def test_cpu_build_has_no_device_backend(cache_model):
    lib = load("cpu")
    m = lib.kvc_open(str(cache_model).encode(), ffi.NULL)
    try:
        assert lib.kvc_sequence_new_on(m, b"cuda", 0, 0, 0, 0, 0) == ffi.NULL
        assert "this build has no cuda backend" in ffi.string(lib.kvc_last_error()).decode()
    finally:
        lib.kvc_close(m)


# ----------------------------------------------------------------------------------------------
# The CLI: the same flags and the same output on every device


def test_cli_generates_the_same_text_on_every_device(device, cache_model):
    exe = ROOT / ("run_cuda_sim" if device == "cuda-sim" else "run_cuda")
    args = [cache_model, "-n", "24", "-t", "0", "-i", "hello", "-ctk", "q8_0", "-ctv", "f16"]
    cpu = run_cli(*args)
    assert cpu.returncode == 0, cpu.stderr
    for extra in ([], ["--device", device]):  # the GPU by default in a device build
        out = run_cli(*args, *extra, exe=exe)
        assert out.returncode == 0, out.stderr
        assert out.stdout == cpu.stdout and len(out.stdout) > len("hello")
    on_cpu = run_cli(*args, "--device", "cpu", exe=exe)
    assert on_cpu.returncode == 0 and on_cpu.stdout == cpu.stdout
    bad = run_cli(*args, "-ctk", "q4_0", exe=exe)
    assert bad.returncode == 1 and bad.stderr.decode().count("\n") == 1 and b"no q4_0 KV cache" in bad.stderr


def test_cpu_cli_refuses_a_device(cache_model):
    out = run_cli(cache_model, "-n", "4", "--device", "cuda")
    assert out.returncode == 1 and b"this build has no cuda backend" in out.stderr


# ----------------------------------------------------------------------------------------------
# The simulation catches what it claims to (tests/cuda/planted_bugs.cu: each bug, and its fix)

PLANTED = ROOT / "tests" / "cuda" / "planted_bugs.cu"


def build_planted(tmp_path: Path, sanitizer: str | None) -> Path:
    exe = tmp_path / f"planted_{sanitizer or 'plain'}"
    flags = [f"-fsanitize={sanitizer}", "-g", "-O1"] if sanitizer else ["-O1"]
    out = subprocess.run(["g++", "-std=c++17", *flags, "-x", "c++", "-o", str(exe), str(PLANTED), "-lpthread"],
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert out.returncode == 0, out.stderr
    return exe


@pytest.mark.parametrize("sanitizer,case,report", [("address", "oob", "heap-buffer-overflow"),
                                                    ("thread", "race", "data race"),
                                                    (None, "deadlock", "cuda_sim: deadlock")])
def test_sim_catches_planted_bug(tmp_path, sanitizer, case, report):
    """ASan sees a kernel read past a cudaMalloc'd buffer; TSan sees threads of a block race on
    __shared__ memory without __syncthreads (the sanitized sim runs a block's threads as OS threads);
    the fiber scheduler sees a barrier that only some threads reach. The fixed kernels run clean."""
    exe = build_planted(tmp_path, sanitizer)
    env = {"TSAN_OPTIONS": "exitcode=66", "ASAN_OPTIONS": "exitcode=86:detect_leaks=0"}
    bug = subprocess.run([str(exe), case, "bug"], capture_output=True, text=True, timeout=60, env=env)
    assert bug.returncode != 0 and report in bug.stderr, bug.stderr[-2000:]
    fixed = subprocess.run([str(exe), case, "fixed"], capture_output=True, text=True, timeout=60, env=env)
    assert fixed.returncode == 0 and fixed.stderr == "", fixed.stderr[-2000:]
    assert fixed.stdout.strip() == {"oob": "63", "race": "126", "deadlock": "1"}[case]


# ----------------------------------------------------------------------------------------------
# The GPU build compiles (nvcc for sm_80 and sm_90 plus PTX, -Werror) wherever nvcc is


def test_make_cuda_compiles():
    if nvcc() is None:
        pytest.skip("nvcc not found (neither on PATH nor /usr/local/cuda/bin): the GPU build cannot be compiled here")
    make("cuda")
    for name in ("run_cuda", "libkvc_cuda.so"):
        assert (ROOT / name).is_file()
    obj = (ROOT / "cuda.o").read_bytes()
    for arch in (b"sm_80", b"sm_90"):  # the fatbinary names each architecture it holds
        assert arch in obj, arch


def test_real_kernels_clean_under_asan(tmp_path):
    """cuda.cu's own kernels (tiled prefill, decode, the q8_0 paths) run under ASan + UBSan with each
    block's threads as OS threads: no access outside a buffer, and the same text as the fiber build."""
    make("run_cuda_sim_asan", "run_cuda_sim")
    path = tmp_path / "q8.bin"
    write_random_model(path, seed=3, weight_type=fmt.Q8_0, n_layers=1, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=32)
    args = [path, "-n", "3", "-t", "0", "-i", "hello there", "-ctk", "q8_0", "-ctv", "f16"]
    sanitized = run_cli(*args, exe=ROOT / "run_cuda_sim_asan", timeout=120)  # a name ending in _asan: sanitizer exit codes
    assert sanitized.returncode == 0, sanitized.stderr.decode()[-3000:]
    plain = run_cli(*args, exe=ROOT / "run_cuda_sim")
    assert plain.returncode == 0 and sanitized.stdout == plain.stdout
