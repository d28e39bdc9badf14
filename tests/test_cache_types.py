"""KV cache element types (f16, bf16, q8_0, q4_0, iq4_nl) and the Hadamard rotation, against the reference.

Three checks make "C equals the reference" exact for every type: the C store/load of a row equals
kvc.kvtypes bit for bit on the same input, the attention kernels' scores and weighted sums over the
stored types equal the reference's on the same input (both in the SIMD and the portable build), and
the C forward pass, at every position, equals the reference's attention over exactly what the C
cache holds.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import kvc
from kvc import kvtypes
from kvc.reference import Llama
from helpers import ROOT, decode_from_nan, run_cli, write_random_model

TOL = 1e-4
COMBOS = [("f32", "f32", False), ("f16", "f16", False), ("bf16", "bf16", False), ("q8_0", "q8_0", False),
          ("q8_0", "q8_0", True), ("q4_0", "q8_0", True), ("q4_0", "q4_0", True), ("q4_0", "q4_0", False),
          ("f32", "q4_0", True), ("iq4_nl", "iq4_nl", True), ("iq4_nl", "q8_0", True), ("q8_0", "iq4_nl", False)]

PROBE = r"""
#define KVC_LIBRARY
#include "%s/run.c"
// stdin: int32 rows, int32 n, then rows x n float32; stdout: for each type, rotate 0/1, the rows
// as the cache gives them back (stored, loaded, rotated back)
int main(void) {
    int32_t rows, n;
    if (fread(&rows, 4, 1, stdin) != 1 || fread(&n, 4, 1, stdin) != 1) return 1;
    float *x = malloc((size_t)rows * n * 4), *y = malloc((size_t)n * 4);
    uint8_t *buf = malloc((size_t)n * 4);
    if (fread(x, 4, (size_t)rows * n, stdin) != (size_t)rows * n) return 1;
    for (int type = 0; type < N_CACHE_TYPES; type++)
        for (int rotate = 0; rotate < 2; rotate++)
            for (int r = 0; r < rows; r++) {
                memcpy(y, x + (size_t)r * n, (size_t)n * 4);
                if (rotate) hadamard(y, n);
                store_row(type, buf, y, n);
                load_row(type, buf, y, n);
                if (rotate) hadamard(y, n);
                fwrite(y, 4, n, stdout);
            }
    return 0;
}
"""


def probe_rows(n: int) -> np.ndarray:
    """Rows that reach every corner of the conversions: scales from subnormal to past fp16's range,
    zeros, signed zeros, ties, one outlier per row, exact grid values."""
    rng = np.random.default_rng(7)
    rows = [rng.standard_normal(n) * scale for scale in (1e-8, 1e-3, 0.1, 1, 10, 3e4, 1e5)]
    rows += [np.zeros(n), -np.zeros(n), np.full(n, 0.5), np.arange(n) - n / 2, np.arange(n) / 8 - 2]
    outlier = rng.standard_normal(n)
    outlier[3] = 50
    rows += [outlier, -outlier, np.repeat([1.0, -1.0], n // 2), rng.standard_normal(n) * 65504 / 4]
    halves = rng.integers(-127, 128, n) * (1 / 127) + 0.5 / 127  # on q8_0's rounding ties
    rows += [halves, np.float32(2.0) ** rng.integers(-24, 15, n)]
    return np.asarray(rows, dtype=np.float32)


KERNEL_PROBE = r"""
#define KVC_LIBRARY
#include "%s/run.c"
// stdin: int32 type_k, type_v, rotate, head_dim, group, n; then float32 q (group, hd), keys and values
// (n, 2 hd: two kv heads), weights (group, n), key_mean (2 hd). stdout: the second kv head's scores
// (group, n) from kv_dot with scale 1, then sum_i weights v_i (group, hd) from kv_axpy, rotated back,
// both read run by run as attention reads them.
int main(void) {
    int32_t a[6];
    if (fread(a, 4, 6, stdin) != 6) return 1;
    int hd = a[3], group = a[4], n = a[5];
    Config p = {.n_layers = 1, .n_heads = 2 * group, .n_kv_heads = 2, .head_dim = hd};
    CacheSpec spec = cache_spec(a[0], a[1], a[2], hd);
    size_t nq = (size_t)group * hd, nkv = (size_t)n * 2 * hd, nw = (size_t)group * n, all = nq + 2 * nkv + nw + 2 * hd;
    float *x = malloc(all * 4), *f = malloc(nq * 4), *att = malloc(nw * 4), *out = calloc(nq, 4);
    uint8_t *int8 = malloc((size_t)group * query_int8_bytes(hd));
    if (fread(x, 4, all, stdin) != all) return 1;
    // a pool of blocks of 16, the table's in reverse order, so that runs end at every block's edge
    int bs = 16, blocks = (n + bs - 1) / bs;
    KVPool pool;
    KVCache c;
    if (cache_spec_check(&spec, hd) || pool_init(&pool, &p, &spec, blocks, bs, blocks * bs, blocks, 0, x + nq + 2 * nkv + nw))
        return 1;
    if (cache_init(&c, &pool, n, 0)) return 1;
    for (int i = 0; i < blocks; i++) c.table[c.n_table++] = pool_take(&pool, blocks - 1 - i);
    cache_reserve(&c, 0, n); // nothing left to take: marks position 0's sink slot
    KVCache **seqs = malloc((size_t)n * sizeof *seqs);
    int *pos = malloc((size_t)n * sizeof *pos);
    for (int t = 0; t < n; t++) seqs[t] = &c, pos[t] = t;
    cache_write(seqs, pos, n, 0, x + nq, x + nq + nkv);
    KVQuery q = cache_query(&pool, x, group, f, int8);
    for (int i = 0; i < n;) {
        KVRun run = cache_run(&c, 0, i, n - i);
        kv_dot(&run, 1, &q, group, hd, 1.0f, att + i, (size_t)n);
        kv_axpy(&run, 1, x + nq + 2 * nkv + i, (size_t)n, group, hd, out);
        i += run.n;
    }
    cache_output(&pool, out, group);
    fwrite(att, 4, nw, stdout);
    fwrite(out, 4, nq, stdout);
    return 0;
}
"""


def build_probe(source: str, arch: str, d) -> object:
    """A probe program compiled against run.c for the SIMD (native) or the portable build."""
    (d / "probe.c").write_text(source % ROOT)
    flag = "-march=native" if arch == "native" else "-march=x86-64"
    cc = subprocess.run(["cc", "-O3", flag, "-fopenmp", "-o", str(d / "probe"), str(d / "probe.c"), "-lm"],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return d / "probe"


@pytest.fixture(scope="module", params=["native", "portable"])
def probe(request, tmp_path_factory):
    return build_probe(PROBE, request.param, tmp_path_factory.mktemp("cache_probe"))


@pytest.fixture(scope="module", params=["native", "portable"])
def kernel_probe(request, tmp_path_factory):
    return build_probe(KERNEL_PROBE, request.param, tmp_path_factory.mktemp("kernel_probe"))


KERNEL_SHAPES = [(32, 1, 1), (64, 3, 40), (64, 9, 17), (96, 2, 33), (128, 4, 16), (64, 1, 100)]


@pytest.mark.parametrize("type_k,type_v,rotate", COMBOS, ids=[f"{k}-{v}{'-rot' if r else ''}" for k, v, r in COMBOS])
def test_attention_kernels_read_the_stored_types(kernel_probe, type_k, type_v, rotate):
    """kv_dot and kv_axpy, SIMD and portable, against the reference on the same inputs: scores of the
    query as read (int8 for q8_0/q4_0/iq4_nl keys) with the stored keys (iq4_nl: less a key mean,
    position 0 as q8_0), and weighted sums of the stored values, for head sizes with odd blocks,
    groups wider than one register pass, and partial tiles.
    Bound: float32 rounding, 1e-5 of |q| |k| for a score and of sum_i |w_i| |v_i| for a sum (norms:
    the rotations spread rounding over a head)."""
    ids = {name: i for i, name in enumerate(kvtypes.CACHE_TYPES)}
    rng = np.random.default_rng(5)
    for hd, group, n in KERNEL_SHAPES:
        if rotate and hd & (hd - 1):
            continue
        q = rng.standard_normal((group, hd)).astype(np.float32)
        keys = (rng.standard_normal((n, 2 * hd)) * 2).astype(np.float32)
        values = rng.standard_normal((n, 2 * hd)).astype(np.float32)
        weights = rng.random((group, n)).astype(np.float32)
        mean = (rng.standard_normal(2 * hd) * (n % 2)).astype(np.float32)  # zero for some shapes: no mean
        head = np.int32([ids[type_k], ids[type_v], rotate, hd, group, n]).tobytes()
        stdin = head + q.tobytes() + keys.tobytes() + values.tobytes() + weights.tobytes() + mean.tobytes()
        out = subprocess.run([str(kernel_probe)], input=stdin, capture_output=True, check=True, timeout=30).stdout
        got = np.frombuffer(out, dtype=np.float32)
        att, summed = got[:group * n].reshape(group, n), got[group * n:].reshape(group, hd)
        positions = torch.arange(n)
        k = kvtypes.stored_rows(torch.from_numpy(keys[:, None, hd:]), positions, type_k, rotate,
                                torch.from_numpy(mean[None, hd:]))[:, 0].double()
        v = kvtypes.stored_rows(torch.from_numpy(values[:, None, hd:]), positions, type_v, rotate)[:, 0].double()
        qr = kvtypes.query_as_read(torch.from_numpy(q), type_k, rotate).double()
        w = torch.from_numpy(weights).double()
        att_bound = 1e-5 * qr.norm(dim=1)[:, None] * k.norm(dim=1)[None, :]
        assert np.all(np.abs(att - (qr @ k.T).numpy()) <= att_bound.numpy()), (hd, group, n)
        sum_error = np.linalg.norm(summed - (w @ v).numpy(), axis=1)
        assert np.all(sum_error <= 1e-5 * (w.abs() @ v.norm(dim=1)).numpy()), (hd, group, n)


@pytest.mark.parametrize("n", [32, 64, 128])
def test_stored_rows_match_the_reference_bit_for_bit(probe, n):
    x = probe_rows(n)
    stdin = np.int32(len(x)).tobytes() + np.int32(n).tobytes() + x.tobytes()
    out = subprocess.run([str(probe)], input=stdin, capture_output=True, check=True, timeout=30).stdout
    got = np.frombuffer(out, dtype=np.float32).reshape(len(kvtypes.CACHE_TYPES), 2, len(x), n)
    for t, name in enumerate(kvtypes.CACHE_TYPES):
        for rotate in (False, True):
            want = kvtypes.stored(torch.from_numpy(x), name, rotate).numpy()
            same = (got[t, int(rotate)].view(np.uint32) == want.view(np.uint32)) | (np.isnan(want) & np.isnan(got[t, int(rotate)]))
            assert same.all(), f"{name} rotate={rotate}: {(~same).sum()} values differ, e.g. row {np.argwhere(~same)[0]}"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A random model (head_dim 32) with a random key_mean, which iq4_nl keys are stored less."""
    path = tmp_path_factory.mktemp("cache_types") / "m.bin"
    write_random_model(path, seed=11, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, seq_len=200, key_mean=True)
    return path


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 300, n)]


@pytest.mark.parametrize("type_k,type_v,rotate", COMBOS, ids=[f"{k}-{v}{'-rot' if r else ''}" for k, v, r in COMBOS])
def test_attention_reads_exactly_what_the_cache_holds(model_path, type_k, type_v, rotate):
    """At every position (a prefill block, then token by token, with split attention), the C logits
    equal the reference attending over the C cache's own contents; unwritten slots stay NaN; and
    the stored keys and values are the reference's rounding of its own K/V, up to one rounding step."""
    model = kvc.Model(model_path, cache_type_k=type_k, cache_type_v=type_v, cache_rotate=rotate, threads=2)
    assert model.cache_rotate == rotate
    tokens = prompt(150, seed=3)
    logits, keys, values = decode_from_nan(model, tokens, 90)
    ref = Llama.load(model_path, cache_type_k=type_k, cache_type_v=type_v, cache_rotate=rotate)  # its query as C reads keys
    error = np.abs(logits - ref.forward_reading(tokens, keys, values)).max(axis=-1)
    if type_k in kvtypes.INT8_TYPES:
        # the reference's query is C's up to float32 rounding, so a query value within that of a
        # rounding tie of its int8 grid can round the other way: a step of one value at a few positions
        assert (error <= TOL).mean() >= 0.95 and error.max() <= 0.05, np.sort(error)[-10:]
    else:
        assert error.max() <= TOL

    typed = Llama.load(model_path, cache_type_k=type_k, cache_type_v=type_v, cache_rotate=rotate)
    typed.forward(tokens, 0)
    raw = Llama.load(model_path)
    raw.forward(tokens, 0)
    for got, want, exact in ((keys, typed.k_cache, raw.k_cache), (values, typed.v_cache, raw.v_cache)):
        want, exact = want[:, :150].numpy(), exact[:, :150].numpy()
        rounding = np.abs(want - exact).max()  # the type's own error
        assert np.abs(got[:, :150] - want).max() <= 2.5 * rounding + TOL


def test_quantized_types_cost_little_on_a_random_model(model_path):
    """Sanity of the scale of each type's error (the quality tool measures it on real text)."""
    tokens = prompt(120, seed=5)
    base = Llama.load(model_path).forward_full(tokens)
    errors = {}
    for type_k, type_v, rotate in COMBOS[1:]:
        got = kvc.Model(model_path, cache_type_k=type_k, cache_type_v=type_v, cache_rotate=rotate).forward(tokens)
        errors[(type_k, type_v, rotate)] = np.abs(got - base).max()
    assert errors[("f16", "f16", False)] < errors[("q8_0", "q8_0", False)] < errors[("q4_0", "q4_0", False)]
    assert errors[("bf16", "bf16", False)] < errors[("q4_0", "q4_0", True)]
    assert max(errors.values()) < np.abs(base).max()  # still the same model


def test_bad_cache_types(model_path, tmp_path):
    with pytest.raises(ValueError, match="unknown cache type"):
        kvc.Model(model_path, cache_type_k="q9")
    odd = tmp_path / "hd48.bin"
    write_random_model(odd, dim=96, hidden_dim=64, n_heads=2, n_kv_heads=2)  # head_dim 48: no groups of 32
    with pytest.raises(ValueError, match="does not divide head_dim"):
        kvc.Model(odd, cache_type_v="q8_0")
    with pytest.raises(ValueError, match="power of two"):
        kvc.Model(odd, cache_rotate=True)
    assert kvc.Model(odd, cache_type_k="f16", cache_type_v="bf16").forward([1, 2]).shape == (2, 300)
    hd96 = tmp_path / "hd96.bin"
    write_random_model(hd96, dim=192, hidden_dim=64, n_heads=2, n_kv_heads=2)  # groups of 32 fit, no rotation
    m = kvc.Model(hd96, cache_type_k="q4_0", cache_type_v="q4_0")  # the default does not rotate here, as llama.cpp
    assert m.cache_rotate is False and m.forward([1, 2]).shape == (2, 300)
    with pytest.raises(ValueError, match="power of two"):
        kvc.Model(hd96, cache_type_k="q4_0", cache_rotate=True)
    proc = run_cli(odd, "-ctk", "q4_0", "-i", "hi")
    assert proc.returncode == 1 and proc.stderr.decode().startswith("error: cache types q4_0/f32")
    assert len(proc.stderr.decode().splitlines()) == 1
    for flags in (["-ctk", "q9"], ["--cache-type-v", ""], ["--cache-rotate", "yes"]):
        proc = run_cli(model_path, *flags, "-i", "hi")
        assert proc.returncode == 1 and proc.stderr.decode().startswith("error: "), flags


def test_cli_cache_types_generate(model_path):
    """The CLI's flags reach the cache: f16 keeps greedy output here, and every type generates."""
    runs = {}
    for flags in ([], ["-ctk", "f16", "-ctv", "f16"], ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"],
                  ["-ctk", "q4_0", "-ctv", "q4_0", "--cache-rotate", "off"], ["-ctk", "q4_0", "-ctv", "q4_0"]):
        proc = run_cli(model_path, "-t", "0", "-n", "24", *flags, "-i", "hello")
        assert proc.returncode == 0, proc.stderr.decode()
        runs[" ".join(flags)] = proc.stdout
    assert runs["-ctk f16 -ctv f16"] == runs[""]
    assert runs["-ctk q4_0 -ctv q4_0 --cache-rotate off"] != runs["-ctk q4_0 -ctv q4_0"]  # rotation changes the rounding


def test_memory_accounting(model_path):
    """Model.memory(): the mapped file, the cache in its own types (2 x layers x positions x row bytes),
    and the scratch; a q8_0 cache is 34/128 of an f32 one (34 bytes per 32 values against 128)."""
    f32 = kvc.Model(model_path).memory()
    q8 = kvc.Model(model_path, cache_type_k="q8_0", cache_type_v="q8_0").memory()
    mixed = kvc.Model(model_path, cache_type_k="q4_0", cache_type_v="f16").memory()
    c = kvc.Model(model_path).config
    assert f32["weights"] == model_path.stat().st_size
    assert f32["kv_cache"] == 2 * c.n_layers * c.seq_len * c.kv_dim * 4
    assert q8["kv_cache"] * 128 == f32["kv_cache"] * 34
    assert mixed["kv_cache"] == c.n_layers * c.seq_len * c.kv_dim // 32 * (18 + 64)
    assert 0 < f32["scratch"] == q8["scratch"] and f32["total"] == f32["weights"] + f32["kv_cache"] + f32["scratch"]


RSS_SCRIPT = """
import sys, numpy as np, kvc
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
m = kvc.Model(sys.argv[1], seq_len=int(sys.argv[2]), cache_type_k=sys.argv[3], cache_type_v=sys.argv[3], threads=1)
before = rss()
m.reset(fill=np.nan)  # touches every page of the cache
print(rss() - before, m.memory()["kv_cache"])
"""


def test_a_smaller_cache_type_really_takes_less_memory(tmp_path):
    """The cache is allocated in its type: touching every slot grows RSS by the accounted bytes."""
    path = tmp_path / "wide.bin"
    write_random_model(path, dim=256, hidden_dim=64, n_layers=4, n_heads=4, n_kv_heads=4, seq_len=8192)
    grown = {}
    for t in ("f32", "q8_0"):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), "8192", t], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        grown[t], accounted = map(int, proc.stdout.split())
        assert abs(grown[t] - accounted) < 0.1 * accounted + (4 << 20), (t, grown[t], accounted)
    assert grown["q8_0"] < 0.35 * grown["f32"]


def test_no_cache_generates_the_same_text(model_path):
    """Without a cache every token recomputes the whole sequence: the greedy output is the same."""
    m = kvc.Model(model_path)
    cached = "".join(m.generate("hello there", max_tokens=20, temperature=0))
    uncached = "".join(m.generate("hello there", max_tokens=20, temperature=0, use_cache=False))
    assert uncached == cached and m.stats.generated_tokens == 20
    a = run_cli(model_path, "-t", "0", "-n", "20", "-i", "hello there")
    b = run_cli(model_path, "-t", "0", "-n", "20", "--no-cache", "-i", "hello there")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    chat = run_cli(model_path, "-m", "chat", "--no-cache")
    assert chat.returncode == 1 and b"--no-cache works with -m generate only" in chat.stderr


def test_c_api_refuses_unknown_type_numbers(model_path):
    """kvc_sequence_new with a type number outside the table: an error before anything is sized."""
    from kvc._lib import ffi, last_error, load
    lib = load()
    m = lib.kvc_open(str(model_path).encode(), ffi.NULL)
    try:
        for type_k, type_v in ((7, 0), (0, -1), (2**31 - 1, 0)):
            assert lib.kvc_sequence_new(m, 0, 1, type_k, type_v, -1) == ffi.NULL
            assert "unknown cache type" in last_error()
    finally:
        lib.kvc_close(m)


def test_kv_cache_views_are_the_cache_itself(model_path):
    """f32 and f16 caches (unrotated) are numpy views: no copy, following every forward and reset,
    read-only, alive after close(); other types refuse with a pointer to the float32 copy."""
    tokens = prompt(40, seed=9)
    for cache_type, dtype in (("f32", np.float32), ("f16", np.float16)):
        m = kvc.Model(model_path, cache_type_k=cache_type, cache_type_v=cache_type)
        keys, values = m.kv_cache_view()
        c = m.config
        assert keys.dtype == values.dtype == dtype and keys.shape == (c.n_layers, c.seq_len, c.n_kv_heads, c.head_dim)
        assert not keys.flags.writeable and not values.flags.writeable
        m.forward(tokens, 0)
        copy_k, copy_v = m.kv_cache
        assert np.array_equal(keys.astype(np.float32).reshape(copy_k.shape), copy_k)
        assert np.array_equal(values.astype(np.float32).reshape(copy_v.shape), copy_v)
        m.reset(fill=np.nan)
        assert np.isnan(keys).all()  # the same memory, not a snapshot
        m.forward(tokens[:5], 0)
        m.close()
        assert np.isfinite(keys[:, :5]).all() and np.isnan(keys[:, 5:]).all()  # still readable after close
        del keys, values
    for kw in ({"cache_type_k": "q8_0"}, {"cache_type_v": "bf16"}, {"cache_type_k": "f16", "cache_rotate": True}):
        with pytest.raises(ValueError, match="use kv_cache for a copy"):
            kvc.Model(model_path, **kw).kv_cache_view()
