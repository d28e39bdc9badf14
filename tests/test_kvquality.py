"""python -m kvc.kvquality: what each KV cache type costs, on a tiny random model with a byte tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvc import kvquality
from helpers import model_and_text, run_module

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random model with head_dim 32 (one q8_0/q4_0 block per head) and a text file of ~700 bytes."""
    return model_and_text(tmp_path_factory.mktemp("kvquality"), dim=128, n_heads=4, n_kv_heads=2, seq_len=512)


@pytest.fixture(scope="module")
def report(tiny):
    """The tool run as a command: two chunks of 256 tokens, its stdout and its JSON."""
    out = tiny / "out.json"
    proc = run_module("kvc.kvquality", tiny / "tiny.bin", "--text", tiny / "text.txt", "--ctx", "256", "--chunks", "2",
                      "--threads", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def rows_by_label(result: dict) -> dict[str, dict]:
    return {kvquality.CacheSetup(r["k"], r["v"], r["rotate"]).label: r for r in result["rows"]}


def test_json_has_every_combination(report):
    _, result = report
    assert result["ctx"] == 256 and result["chunks"] == 2 and result["scored_per_chunk"] == 127
    labels = [s.label for s in [kvquality.REFERENCE, *kvquality.SETUPS]]
    assert list(rows_by_label(result)) == labels
    assert {"q8_0/q8_0", "q8_0/q8_0 rot", "q4_0/q8_0", "q4_0/q8_0 rot", "q4_0/q4_0", "q4_0/q4_0 rot"} <= set(labels)


def test_table_printed(report):
    stdout, result = report
    assert "second half of each chunk" in stdout
    assert stdout.count("\n| ") == len(result["rows"]) + 1  # the header and one line per row


def test_reference_against_itself(report):
    ref = rows_by_label(report[1])["f32/f32"]
    assert ref["mean_kl"] == 0 and ref["max_kl"] == 0 and ref["top1_agreement"] == 1 and ref["ppl_ratio"] == 1


def test_costs_ordered(report):
    rows = rows_by_label(report[1])
    for r in rows.values():
        assert np.isfinite([r["ppl"], r["mean_kl"], r["p99_kl"], r["max_kl"]]).all()
        assert r["mean_kl"] >= 0 and r["max_kl"] >= r["p99_kl"] >= 0 and 0 <= r["top1_agreement"] <= 1
    kl = {label: r["mean_kl"] for label, r in rows.items()}
    for rot in ("", " rot"):
        assert kl["q4_0/q4_0" + rot] > kl["q8_0/q8_0" + rot] > kl["f16/f16"] > 0
        assert kl["q4_0/q8_0" + rot] > kl["q8_0/q8_0" + rot]


def test_quick_preset(tiny):
    args = kvquality.parse_args([str(tiny / "tiny.bin"), "--quick"])
    assert (args.ctx, args.chunks) == (256, 1)
    args = kvquality.parse_args([str(tiny / "tiny.bin")])
    assert (args.ctx, args.chunks) == (2048, None)


def test_chunks_start_with_bos():
    chunks = kvquality.make_chunks(list(range(10, 30)), ctx=6, n_chunks=None, bos=1)
    assert len(chunks) == 3
    assert [c.tolist() for c in chunks] == [[1, 11, 12, 13, 14, 15], [1, 17, 18, 19, 20, 21], [1, 23, 24, 25, 26, 27]]
    with pytest.raises(ValueError, match="3 chunk"):
        kvquality.make_chunks(list(range(20)), ctx=6, n_chunks=4, bos=1)


def test_position_stats_match_direct_formula():
    """KL(p || q), NLLs and agreement as computed directly, across several slices of rows."""
    rng = np.random.default_rng(0)
    n = kvquality.SLICE_ROWS * 2 + 5
    ref = rng.standard_normal((n, 50)).astype(np.float32) * 3
    test = ref + rng.standard_normal(ref.shape).astype(np.float32)
    targets = rng.integers(0, 50, n)
    stats = kvquality.position_stats(ref, test, targets)
    p = np.exp(ref.astype(np.float64)) / np.exp(ref.astype(np.float64)).sum(-1, keepdims=True)
    q = np.exp(test.astype(np.float64)) / np.exp(test.astype(np.float64)).sum(-1, keepdims=True)
    np.testing.assert_allclose(stats["kl"], (p * np.log(p / q)).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(stats["nll_test"], -np.log(q[np.arange(n), targets]), rtol=1e-10)
    np.testing.assert_array_equal(stats["top1"], ref.argmax(-1) == test.argmax(-1))
    same = kvquality.position_stats(ref, ref, targets)
    assert (same["kl"] == 0).all() and same["top1"].all()


def test_too_short_text_is_an_error(tiny, capsys):
    assert kvquality.main([str(tiny / "tiny.bin"), "--text", str(tiny / "text.txt"), "--ctx", "512",
                           "--chunks", "2"]) == 1
    assert "1 chunk(s) of 512 fit, asked for 2" in capsys.readouterr().err
