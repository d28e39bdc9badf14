"""python -m kvc.mem (what the KV cache costs in bytes) and python -m kvc's cache-type flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvc
import kvc.__main__
from kvc import mem
from helpers import ROOT, run_cli, write_random_model

TYPE_PAIRS = [("f32", "f32"), ("f16", "f16"), ("bf16", "q8_0"), ("q8_0", "q8_0"), ("q4_0", "f32"), ("q4_0", "q4_0")]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A random kvc model whose head_dim (32) takes every cache type; context 96."""
    path = tmp_path_factory.mktemp("mem") / "m.bin"
    write_random_model(path, dim=128, n_heads=4, n_kv_heads=2, seq_len=96)
    return path


def run_json(capsys, *argv) -> dict:
    """python -m kvc.mem ARGV --json, in process: its one JSON object."""
    assert mem.main([*map(str, argv), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1
    return json.loads(out)


def run_text(capsys, *argv) -> str:
    """python -m kvc.mem ARGV, in process: its report."""
    assert mem.main(list(map(str, argv))) == 0
    return capsys.readouterr().out


def fails(capsys, *argv) -> str:
    """python -m kvc.mem ARGV must fail with one `error:` line and nothing on stdout; the line."""
    assert mem.main(list(map(str, argv))) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    return err


@pytest.mark.parametrize("type_k,type_v", TYPE_PAIRS)
@pytest.mark.parametrize("seq_len", [1, 40, 96])
def test_bin_equals_the_engines_accounting(capsys, model_path, type_k, type_v, seq_len):
    r = run_json(capsys, model_path, "--seq-len", seq_len, "-ctk", type_k, "-ctv", type_v, "--threads", 1)
    m = kvc.Model(model_path, seq_len=seq_len, cache_type_k=type_k, cache_type_v=type_v, threads=1).memory()
    assert (r["kv_bytes"], r["weights_bytes"], r["scratch_bytes"]) == (m["kv_cache"], m["weights"], m["scratch"])
    assert r["total_bytes"] == m["total"]
    assert r["kv_bytes_per_token"] * seq_len == r["kv_bytes"]


def test_bin_defaults_to_its_context_and_f32(capsys, model_path):
    r = run_json(capsys, model_path)
    assert (r["seq_len"], r["cache_type_k"], r["cache_type_v"]) == (96, "f32", "f32")
    assert r["kv_bytes"] == kvc.Model(model_path).memory()["kv_cache"] == 2 * 2 * 64 * 96 * 4
    assert r["gqa_saving"] == 2 and r["mha_kv_bytes"] == 2 * r["kv_bytes"]


def test_batch_multiplies_cache_and_scratch(capsys, model_path):
    one = run_json(capsys, model_path, "--seq-len", 50, "--threads", 1)
    three = run_json(capsys, model_path, "--seq-len", 50, "--threads", 1, "--batch", 3)
    assert three["kv_bytes_per_token"] == one["kv_bytes_per_token"]
    assert three["kv_bytes"] == 3 * one["kv_bytes"] and three["scratch_bytes"] == 3 * one["scratch_bytes"]
    assert three["weights_bytes"] == one["weights_bytes"]


def test_familiar_examples(capsys):
    """A 70B-sized model with 64 KV heads in f16 at 4096 tokens is 10.7 GB; Llama 3 8B is 128 KiB a token."""
    shape = ["--layers", 80, "--kv-heads", 64, "--head-dim", 128, "-ctk", "f16", "-ctv", "f16", "--seq-len", 4096]
    r = run_json(capsys, *shape)
    assert r["kv_bytes"] == r["total_bytes"] == 10_737_418_240 and r["weights_bytes"] is None
    assert r["gqa_saving"] is None
    text = run_text(capsys, *shape)
    assert "2 (K, V) x 80 layers x 64 kv_heads x 128 head_dim x 4096 seq_len x 1 batch x 2 bytes" in text
    assert "10,737,418,240 bytes (10.7 GB, 10 GiB)" in text

    r = run_json(capsys, "llama-3-8b", "-ctk", "f16", "-ctv", "f16")
    assert r["kv_bytes_per_token"] == 131_072 and r["gqa_saving"] == 4 and r["seq_len"] == 8192
    assert r["mha_kv_bytes"] == 4 * r["kv_bytes"]
    text = run_text(capsys, "llama-3-8b", "-ctk", "f16", "-ctv", "f16")
    assert "131,072 bytes per token (131 kB, 128 KiB)" in text and "GQA saves 4x" in text


def test_quantized_types_show_fractional_bytes(capsys):
    text = run_text(capsys, "llama-2-7b", "-ctk", "q8_0", "-ctv", "q4_0", "--seq-len", 1)
    assert "(34/32 K q8_0 + 18/32 V q4_0 bytes per value)" in text and "MHA" in text
    r = run_json(capsys, "llama-2-7b", "-ctk", "q8_0", "-ctv", "q4_0", "--seq-len", 1)
    assert r["kv_bytes"] == 32 * 32 * 128 * (34 + 18) // 32


def test_presets_shapes():
    for name, (layers, heads, kv_heads, head_dim, context) in mem.PRESETS.items():
        s = mem.shape_from_source(name)
        shape = (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.context)
        assert shape == (layers, heads, kv_heads, head_dim, context)
        assert heads % kv_heads == 0 and head_dim % 32 == 0  # every cache type fits


@pytest.mark.parametrize("type_k,type_v", [("f32", "f32"), ("q8_0", "q4_0"), ("f16", "bf16")])
def test_gguf_equals_the_exported_bin_and_the_preset(capsys, smollm2_gguf, smollm2_bin, type_k, type_v):
    types = ["-ctk", type_k, "-ctv", type_v]
    from_gguf = run_json(capsys, smollm2_gguf, *types)
    from_bin = run_json(capsys, smollm2_bin, *types, "--threads", 1)
    preset = run_json(capsys, "smollm2-135m", *types)
    keys = ["n_layers", "n_heads", "n_kv_heads", "head_dim", "seq_len", "kv_bytes_per_token", "kv_bytes", "gqa_saving"]
    assert [from_gguf[k] for k in keys] == [from_bin[k] for k in keys] == [preset[k] for k in keys]
    assert from_gguf["weights_bytes"] == smollm2_gguf.stat().st_size and from_gguf["scratch_bytes"] is None
    assert from_bin["kv_bytes"] == kvc.Model(smollm2_bin, cache_type_k=type_k, cache_type_v=type_v).memory()["kv_cache"]


def test_hf_config(capsys, tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "hidden_size": 4096, "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run_json(capsys, tmp_path / "config.json", "-ctk", "f16", "-ctv", "f16")
    assert r == run_json(capsys, tmp_path, "-ctk", "f16", "-ctv", "f16")  # the folder holding it
    preset = run_json(capsys, "llama-3-8b", "-ctk", "f16", "-ctv", "f16")
    assert {k: r[k] for k in ("kv_bytes", "kv_bytes_per_token", "seq_len", "gqa_saving", "head_dim")} == \
           {k: preset[k] for k in ("kv_bytes", "kv_bytes_per_token", "seq_len", "gqa_saving", "head_dim")}
    assert r["weights_bytes"] is None and r["total_bytes"] == r["kv_bytes"]

    del cfg["num_key_value_heads"], cfg["max_position_embeddings"]
    cfg["head_dim"] = 64  # explicit head_dim wins over hidden_size / heads
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run_json(capsys, tmp_path / "config.json", "--seq-len", 10)
    assert (r["n_kv_heads"], r["head_dim"], r["kv_bytes"], r["gqa_saving"]) == (32, 64, 2 * 32 * 32 * 64 * 10 * 4, 1)
    assert "--seq-len" in fails(capsys, tmp_path / "config.json")  # no context length in the config


def test_bad_input_is_one_error_line(capsys, model_path, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 300)
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{"num_hidden_layers": 0, "num_attention_heads": 4, "hidden_size": 64}')
    assert "no file or preset" in fails(capsys, tmp_path / "missing.bin")
    assert "no file or preset" in fails(capsys, "llama-9-1b")
    assert "unknown cache type" in fails(capsys, "llama-3-8b", "-ctk", "q5_0")
    assert "unknown cache type" in fails(capsys, model_path, "-ctv", "F16")
    for flag in ("--seq-len", "--batch"):
        for value in ("0", "-4", "x", "1.5"):
            assert flag in fails(capsys, "llama-3-8b", flag, value)
    assert "--layers" in fails(capsys, "--layers", 0, "--kv-heads", 8, "--head-dim", 128, "--seq-len", 1)
    assert "--head-dim" in fails(capsys, "--layers", 2, "--kv-heads", 8, "--seq-len", 1)
    assert "not both" in fails(capsys, "llama-3-8b", "--layers", 2)
    assert "--seq-len" in fails(capsys, "--layers", 2, "--kv-heads", 8, "--head-dim", 128)
    small_heads = ["--layers", 2, "--kv-heads", 8, "--head-dim", 16, "--seq-len", 1]
    assert "head_dim 16" in fails(capsys, *small_heads, "-ctk", "q8_0")
    assert "context of 96" in fails(capsys, model_path, "--seq-len", 97)
    assert "--threads" in fails(capsys, model_path, "--threads", 0)
    fails(capsys, garbage)
    assert "num_hidden_layers" in fails(capsys, bad_json)
    fails(capsys)  # no source at all
    assert "llama.block_count" in fails(capsys, small_gguf(tmp_path / "no_layers.gguf", None, 2))
    assert "head_count_kv is [2, 2]" in fails(capsys, small_gguf(tmp_path / "per_layer.gguf", 2, [2, 2]))


def small_gguf(path: Path, layers: int | None, head_count_kv: int | list[int]) -> Path:
    """A GGUF holding only metadata (no block_count when layers is None)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    if layers is not None:
        w.add_block_count(layers)
    w.add_head_count(4)
    w.add_head_count_kv(head_count_kv)
    w.add_embedding_length(128)
    w.add_context_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_python_m_kvc_mem_exit_status(model_path):
    ok = subprocess.run([sys.executable, "-m", "kvc.mem", str(model_path), "--json"], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["kv_bytes"] == 2 * 2 * 64 * 96 * 4
    bad = subprocess.run([sys.executable, "-m", "kvc.mem", "llama-3-8b", "-ctk", "q3"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert (bad.returncode, bad.stdout) == (1, "") and bad.stderr.startswith("error:") and bad.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# python -m kvc chat|generate --cache-type-k/-ctk --cache-type-v/-ctv --cache-rotate


def test_python_m_kvc_cache_flags(model_path, capsys, monkeypatch):
    """The flags reach kvc.Model, and generate prints what a Model with those types generates."""
    seen = {}

    class Recording(kvc.Model):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kvc.__main__, "Model", Recording)
    argv = ["generate", str(model_path), "hello", "--max-tokens", "12", "--temperature", "0"]
    assert kvc.__main__.main([*argv, "-ctk", "q8_0", "--cache-type-v", "q4_0", "--cache-rotate", "off"]) == 0
    out = capsys.readouterr().out
    assert (seen["cache_type_k"], seen["cache_type_v"], seen["cache_rotate"]) == ("q8_0", "q4_0", False)
    model = kvc.Model(model_path, cache_type_k="q8_0", cache_type_v="q4_0", cache_rotate=False)
    assert out == "hello" + "".join(model.generate("hello", max_tokens=12, temperature=0)) + "\n"

    assert kvc.__main__.main([*argv, "--cache-type-k", "f16", "-ctv", "bf16", "--cache-rotate", "on"]) == 0
    assert (seen["cache_type_k"], seen["cache_type_v"], seen["cache_rotate"]) == ("f16", "bf16", True)
    assert kvc.__main__.main(argv) == 0
    assert (seen["cache_type_k"], seen["cache_type_v"], seen["cache_rotate"]) == ("f32", "f32", None)
    capsys.readouterr()

    assert kvc.__main__.main([*argv, "-ctk", "q9"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error:") and "unknown cache type" in err and err.count("\n") == 1


def test_chat_with_cache_types_in_both_faces(smollm2_bin):
    """`make chat CHAT_ARGS="-ctk q8_0 -ctv q8_0"` (./run -m chat) and python -m kvc chat with the same
    flags give the same greedy reply."""
    flags = ["-ctk", "q8_0", "-ctv", "q8_0"]
    c = run_cli(smollm2_bin, "-m", "chat", *flags, "-n", "8", "-t", "0", stdin=b"hi\n")
    assert c.returncode == 0, c.stderr
    py = subprocess.run([sys.executable, "-m", "kvc", "chat", str(smollm2_bin), *flags, "--max-tokens", "8",
                         "--temperature", "0"], input=b"hi\n", capture_output=True, cwd=ROOT, timeout=60,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert py.returncode == 0, py.stderr
    assert c.stdout.startswith(b"User: Assistant: ") and c.stdout.split(b"\n")[0] == py.stdout.split(b"\n")[0]
