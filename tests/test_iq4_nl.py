"""The iq4_nl KV cache type and the key_mean it reads from the model file.

iq4_nl stores GGML's block_iq4_nl (an fp16 scale, 32 nibbles indexing 16 int8 levels); run.c's
quantizer searches ten scales and must store the very bytes kvc.kvtypes computes. Its keys are stored
less the file's key_mean (the exporter measures it) and position 0 as q8_0. The attention kernels
and the forward pass against the reference are in test_cache_types.py with the other types.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

import kvc
from kvc import format as fmt
from kvc import kvtypes
from kvc.mem import Shape, cost
from kvc.reference import Llama
from helpers import ROOT, run_cli, write_random_model

HEADS32 = dict(dim=128, hidden_dim=64, n_heads=4, n_kv_heads=2)  # head_dim 32: one iq4_nl block a head

STORE_PROBE = r"""
#define KVC_LIBRARY
#include "%s/run.c"
// stdin: int32 blocks, then blocks x 32 float32; stdout: each block as store_row stores it in iq4_nl
int main(void) {
    int32_t blocks;
    if (fread(&blocks, 4, 1, stdin) != 1) return 1;
    float x[CACHE_GROUP];
    uint8_t b[2 + CACHE_GROUP / 2];
    for (int i = 0; i < blocks; i++) {
        if (fread(x, 4, CACHE_GROUP, stdin) != CACHE_GROUP) return 1;
        store_row(CACHE_IQ4_NL, b, x, CACHE_GROUP);
        fwrite(b, 1, sizeof b, stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module", params=["native", "portable"])
def store_probe(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("iq4_probe")
    (d / "probe.c").write_text(STORE_PROBE % ROOT)
    flag = "-march=native" if request.param == "native" else "-march=x86-64"
    cc = subprocess.run(["cc", "-O3", flag, "-fopenmp", "-o", str(d / "probe"), str(d / "probe.c"), "-lm"],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return d / "probe"


def adversarial_blocks() -> np.ndarray:
    """Blocks of 32 that reach every branch of the quantizer: random at scales from below fp16's
    subnormals to past its range, zeros of both signs, rounding ties at exact scales, equal peaks of
    both signs, one outlier, and NaN / Inf."""
    rng = np.random.default_rng(3)
    levels = np.array(kvtypes.IQ4_NL_LEVELS, np.float64)
    mids = (levels[:-1] + levels[1:]) / 2
    blocks = [rng.standard_normal(32) * s for s in (1e-40, 1e-9, 6e-8, 1e-5, 0.01, 1, 7, 300, 6e4, 1e6, 1e7, 1e9, 3e37)
              for _ in range(8)]
    blocks += [np.zeros(32), -np.zeros(32), np.full(32, 3.0), np.full(32, -3.0), np.repeat([2.0, -2.0], 16)]
    one = np.zeros(32)
    one[5] = -0.75
    blocks.append(one)
    for scale in (1.0, 0.5, 0.25, 3.0):  # d = peak / -127 is exact: values on the midpoints are ties
        tie = np.concatenate([[-127, 13], mids, mids[::-1]]) * scale
        blocks += [tie, -tie, np.roll(tie, 7)]
    outlier = rng.standard_normal(32)
    outlier[20] = 40
    blocks += [outlier, -outlier]
    for bad in (np.nan, np.inf, -np.inf):
        b = rng.standard_normal(32)
        b[9] = bad
        blocks.append(b)
    blocks += list(rng.standard_normal((200, 32)) * rng.lognormal(0, 2, (200, 1)))
    return np.asarray(blocks, dtype=np.float32)


def reference_bytes(x: np.ndarray) -> np.ndarray:
    """kvtypes' iq4_nl blocks of x (B, 32) as bytes (B, 18), laid out as run.c stores them."""
    d, q = kvtypes.iq4_nl_blocks(torch.from_numpy(x))
    q = q.numpy().astype(np.uint8)
    nibbles = q[:, :16] | (q[:, 16:] << 4)
    scale = d.view(torch.int16).numpy().astype("<i2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([scale, nibbles], axis=1)


def test_quantizer_stores_the_reference_bytes(store_probe):
    """run.c's store_iq4_nl (SIMD and portable builds) writes exactly kvtypes' scale and levels."""
    x = adversarial_blocks()
    out = subprocess.run([str(store_probe)], input=np.int32(len(x)).tobytes() + x.tobytes(), capture_output=True,
                         check=True, timeout=60).stdout
    got = np.frombuffer(out, np.uint8).reshape(len(x), 18)
    want = reference_bytes(x)
    differ = np.flatnonzero((got != want).any(axis=1))
    assert differ.size == 0, f"{differ.size} blocks differ, e.g. block {differ[0]}: {got[differ[0]]} vs {want[differ[0]]}"
    nan = ~np.isfinite(x).all(axis=1)
    assert (got[nan, :2].view("<u2")[:, 0] == 0x7E00).all() and (got[nan, 2:] == 0).all()  # store_nonfinite's NaN block


def test_quantizer_picks_the_smallest_error():
    """On random blocks the chosen scale's squared error is mostly below q4_0's, and the levels are
    each value's nearest at that scale."""
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((500, 32)).astype(np.float32))
    err_nl = ((kvtypes.roundtrip(x, "iq4_nl") - x) ** 2).sum(dim=1)
    err_q4 = ((kvtypes.roundtrip(x, "q4_0") - x) ** 2).sum(dim=1)
    assert (err_nl <= err_q4).float().mean() > 0.85 and err_nl.mean() < 0.8 * err_q4.mean()
    d, q = kvtypes.iq4_nl_blocks(x)
    levels = torch.tensor(kvtypes.IQ4_NL_LEVELS, dtype=torch.float32) * d.float()[:, None]
    nearest = (x[:, :, None] - levels[:, None, :]).abs().argmin(dim=2)
    assert (levels.gather(1, nearest) - x).abs().le((levels.gather(1, q) - x).abs() + 1e-6).all()


# ----------------------------------------------------------------------------------------------
# key_mean in the file


def test_key_mean_round_trip(tmp_path):
    """write_model writes key_mean last in the weights section; read_model and run.c read it back;
    a file without one still loads, and both run an iq4_nl cache."""
    with_mean, without = tmp_path / "mean.bin", tmp_path / "plain.bin"
    cfg, tensors = write_random_model(with_mean, seed=4, key_mean=True, **HEADS32)
    write_random_model(without, seed=4, **HEADS32)
    assert np.array_equal(fmt.read_model(with_mean).tensors[fmt.KEY_MEAN], tensors[fmt.KEY_MEAN])
    assert fmt.KEY_MEAN not in fmt.read_model(without).tensors
    assert with_mean.stat().st_size - without.stat().st_size == 4 * np.prod(fmt.key_mean_shape(cfg))
    tokens = [1, 5, 9, 40, 7, 3]
    for path in (with_mean, without):
        got = kvc.Model(path, cache_type_k="iq4_nl", cache_type_v="iq4_nl").forward(tokens)
        want = Llama.load(path, cache_type_k="iq4_nl", cache_type_v="iq4_nl", int8_inputs=True).forward_full(tokens)
        assert np.abs(got - want).max() < 0.05
    # the mean changes what an iq4_nl cache stores, and nothing else
    k_mean = kvc.Model(with_mean, cache_type_k="iq4_nl")
    k_plain = kvc.Model(without, cache_type_k="iq4_nl")
    k_mean.forward(tokens)
    k_plain.forward(tokens)
    assert not np.array_equal(k_mean.kv_cache[0][:, :6], k_plain.kv_cache[0][:, :6])
    assert np.array_equal(kvc.Model(with_mean).forward(tokens), kvc.Model(without).forward(tokens))


def test_cli_notes_a_missing_key_mean_once(tmp_path):
    with_mean, without = tmp_path / "mean.bin", tmp_path / "plain.bin"
    write_random_model(with_mean, key_mean=True, **HEADS32)
    write_random_model(without, **HEADS32)
    proc = run_cli(without, "-ctk", "iq4_nl", "-n", "8", "-t", "0", "-i", "hello")
    assert proc.returncode == 0
    notes = proc.stderr.decode().splitlines()
    assert len([line for line in notes if "key_mean" in line]) == 1 and notes[0].startswith("note: ")
    for path, flags in ((with_mean, ["-ctk", "iq4_nl"]), (without, ["-ctv", "iq4_nl"]), (without, [])):
        proc = run_cli(path, *flags, "-n", "8", "-t", "0", "-i", "hello")
        assert proc.returncode == 0 and b"key_mean" not in proc.stderr


def weights_end(path) -> int:
    h = fmt.unpack_header(path.read_bytes())
    return h["weights.offset"] + h["weights.size"]


def bad_key_mean_files(tmp_path):
    """(name, path, what the error says) for broken key_means."""
    good = tmp_path / "good.bin"
    cfg, _ = write_random_model(good, key_mean=True, **HEADS32)
    data, end = good.read_bytes(), weights_end(good)
    mean_bytes = 4 * int(np.prod(fmt.key_mean_shape(cfg)))
    cases = []
    for name, at, value in (("nan", end - 4, np.nan), ("inf", end - mean_bytes, np.inf)):
        buf = bytearray(data)
        buf[at:at + 4] = np.float32(value).tobytes()
        (tmp_path / f"{name}.bin").write_bytes(bytes(buf))
        cases.append((name, tmp_path / f"{name}.bin", "key_mean"))
    for name, delta in (("short", -4), ("long", 64), ("half", -mean_bytes // 2)):
        buf = bytearray(data)
        h = fmt.unpack_header(buf)
        h["weights.size"] += delta
        buf[:fmt.HEADER.size] = fmt.HEADER.pack(*h.values())
        buf = buf + bytes(delta) if delta > 0 else buf[:end + delta]  # the weights section ends the file
        (tmp_path / f"{name}.bin").write_bytes(bytes(buf))
        cases.append((name, tmp_path / f"{name}.bin", "key_mean"))
    return cases


def test_a_bad_key_mean_is_a_clean_error(tmp_path):
    """A key_mean holding NaN/Inf, or a weights section whose size fits neither the dims nor the dims
    and a key_mean: one error line from the CLI, ValueError from Python (and FormatError from format.py)."""
    for name, path, word in bad_key_mean_files(tmp_path):
        proc = run_cli(path, "-n", "1", "-i", "hi")
        lines = proc.stderr.decode().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], (name, lines)
        with pytest.raises(ValueError, match=word):
            kvc.Model(path)
        with pytest.raises(fmt.FormatError, match=word):
            fmt.read_model(path)
    good = tmp_path / "w.bin"
    cfg, tensors = write_random_model(good, **HEADS32)
    for bad, match in ((np.full(fmt.key_mean_shape(cfg), np.nan, np.float32), "NaN"),
                       (np.zeros((1, 2, 3), np.float32), "expected")):
        with pytest.raises(ValueError, match=match):
            fmt.write_model(tmp_path / "x.bin", cfg, {**tensors, fmt.KEY_MEAN: bad}, fmt.read_model(good).tokenizer)


# ----------------------------------------------------------------------------------------------
# the exporter measures it


def test_export_measures_the_key_mean(tmp_path):
    """export writes the mean post-RoPE key over positions 1.. of the calibration text (checked with
    the torch reference), --no-key-mean writes none, and a re-export measures it again."""
    from export import export_model
    from export.key_mean import calibration_text

    src = tmp_path / "src.bin"
    cfg, _ = write_random_model(src, seed=6, seq_len=96, **HEADS32)
    out = tmp_path / "out.bin"
    export_model(src, out)
    mean = fmt.read_model(out).tensors[fmt.KEY_MEAN]
    tokens = kvc.Model(out).encode(calibration_text())[:cfg.seq_len]
    ref = Llama.load(out)
    ref.forward(tokens, 0)
    want = ref.k_cache[:, 1:len(tokens)].double().mean(dim=1).reshape(fmt.key_mean_shape(cfg)).numpy()
    assert np.abs(mean - want).max() < 1e-4 * np.abs(want).max()
    assert "pydoc" not in calibration_text() and len(tokens) == cfg.seq_len
    export_model(out, tmp_path / "plain.bin", key_mean=False)  # a source's key_mean is not carried over
    assert fmt.KEY_MEAN not in fmt.read_model(tmp_path / "plain.bin").tensors
    export_model(tmp_path / "plain.bin", tmp_path / "again.bin")
    assert np.array_equal(fmt.read_model(tmp_path / "again.bin").tensors[fmt.KEY_MEAN], mean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.bin", "out.bin", "plain.bin", "src.bin"]  # no temp left


# ----------------------------------------------------------------------------------------------
# the cache


def test_cached_decode_equals_recomputation(tmp_path):
    """Token by token through an iq4_nl cache (sink slot included) gives the greedy text that
    recomputing the whole sequence for every token gives."""
    path = tmp_path / "m.bin"
    write_random_model(path, seed=8, key_mean=True, **HEADS32)
    for kw in ({"cache_type_k": "iq4_nl", "cache_type_v": "iq4_nl"}, {"cache_type_k": "iq4_nl", "cache_type_v": "q8_0"}):
        m = kvc.Model(path, **kw)
        cached = "".join(m.generate("hello there", max_tokens=20, temperature=0))
        uncached = "".join(m.generate("hello there", max_tokens=20, temperature=0, use_cache=False))
        assert uncached == cached
    a = run_cli(path, "-t", "0", "-n", "20", "-ctk", "iq4_nl", "-ctv", "iq4_nl", "-i", "hello there")
    b = run_cli(path, "-t", "0", "-n", "20", "-ctk", "iq4_nl", "-ctv", "iq4_nl", "--no-cache", "-i", "hello there")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_memory_counts_the_sink_slots(tmp_path):
    """Model.memory() and kvc.mem: 18 bytes per 32 values at every position, plus position 0 of each
    layer as q8_0 (34 per 32) once for keys and once for values that are iq4_nl."""
    path = tmp_path / "m.bin"
    write_random_model(path, seq_len=96, **HEADS32)
    c = kvc.Model(path).config
    blocks = c.n_layers * c.kv_dim // 32
    for type_k, type_v, sinks, per_block in (("iq4_nl", "iq4_nl", 2, 36), ("iq4_nl", "f16", 1, 18 + 64),
                                             ("q4_0", "iq4_nl", 1, 36)):
        got = kvc.Model(path, cache_type_k=type_k, cache_type_v=type_v).memory()["kv_cache"]
        assert got == blocks * (c.seq_len * per_block + sinks * 34), (type_k, type_v)
        shape = Shape(source=str(path), n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                      head_dim=c.head_dim, context=c.seq_len, checkpoint=path)
        assert cost(shape, None, 1, type_k, type_v)["kv_bytes"] == got
