"""python -m kvc.longppl (perplexity past the context with bounded KV caches) and kvc.bench.window (decode
cost over a long windowed generation), on a tiny random model with a byte tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvc import Model, longppl
from kvc.bench import window
from helpers import PANGRAMS, model_and_text, run_module

TEXT = PANGRAMS
CONTEXT = 160  # the tiny model's: the CLI run scores 400 tokens, past it
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random model with a context of CONTEXT tokens and a text file of ~700 bytes (one token each)."""
    return model_and_text(tmp_path_factory.mktemp("longppl"), seq_len=CONTEXT)


@pytest.fixture(scope="module")
def report(tiny):
    """The tool run as a command: 400 tokens, windows 32 and 64, its stdout and its JSON."""
    out = tiny / "out"
    proc = run_module("kvc.longppl", tiny / "tiny.bin", "--text", tiny / "text.txt", "--tokens", "400",
                      "--window", "32,64", "--chunk", "24", "--bucket", "50", "--threads", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads((out / "longppl.json").read_text()), out


def rows_by_label(result: dict) -> dict[str, dict]:
    return {r["label"]: r for r in result["rows"]}


def test_score_matches_numpy_on_forward_logits(tiny):
    """score()'s chunked NLLs equal -log softmax of one forward() over the whole text, done directly."""
    with Model(tiny / "tiny.bin", threads=1) as m:
        tokens = np.asarray(m.encode(TEXT[:60]), dtype=np.int32)
        nll = longppl.score(m, tokens, chunk=7)
        m.reset()
        logits = m.forward(tokens[:-1], 0).astype(np.float64)
    top = logits.max(-1)
    direct = top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(len(tokens) - 1), tokens[1:]]
    assert nll.shape == (len(tokens) - 1,)
    np.testing.assert_allclose(nll, direct, rtol=1e-4, atol=1e-5)
    assert longppl.perplexity(nll) == pytest.approx(np.exp(direct.mean()), rel=1e-4)


def test_summary_spans():
    """Each perplexity of a row averages the positions its column names."""
    nll = np.log(np.arange(1, 101, dtype=np.float64))  # nll[i] = log(i + 1)
    row = longppl.summarize(longppl.policies([32], sinks=4)[2], nll, context=60, bucket=30)
    geo = lambda a: float(np.exp(np.log(a).mean()))  # noqa: E731
    assert row["label"] == "window 32 + 4 sinks" and row["first_eviction"] == 36 and row["scored"] == 100
    assert row["ppl"] == pytest.approx(geo(np.arange(1, 101)))
    assert row["ppl_context"] == pytest.approx(geo(np.arange(1, 60)))  # dense's span: rows 0..context-2
    assert row["ppl_after_eviction"] == pytest.approx(geo(np.arange(37, 101)))
    assert row["ppl_past_context"] == pytest.approx(geo(np.arange(61, 101)))
    assert row["buckets"] == pytest.approx([geo(np.arange(1, 31)), geo(np.arange(31, 61)), geo(np.arange(61, 91)),
                                            geo(np.arange(91, 101))])
    assert longppl.perplexity(np.array([])) is None


def test_policies():
    labels = [p.label for p in longppl.policies([256, 512])]
    assert labels == ["dense", "window 256", "window 256 + 4 sinks", "h2o 256 (128 recent)",
                      "window 512", "window 512 + 4 sinks", "h2o 512 (256 recent)"]
    assert [p.label for p in longppl.policies([64], sinks=0, h2o_recent=0)] == ["dense", "window 64"]
    h2o = longppl.policies([64], h2o_recent=16)[-1]
    assert dict(h2o.kwargs) == {"h2o": 64, "recent": 16} and h2o.capacity == 64


def test_table_json_and_png(report):
    stdout, result, out = report
    assert result["tokens"] == 400 and result["context"] == CONTEXT and result["bucket"] == 50
    rows = rows_by_label(result)
    assert list(rows) == [p.label for p in longppl.policies([32, 64])]
    dense = rows["dense"]
    assert dense["scored"] == CONTEXT - 1 and dense["ppl"] == dense["ppl_context"] and dense["ppl_past_context"] is None
    assert len(dense["buckets"]) == 4 and np.isfinite(dense["ppl"])
    assert stdout.count("\n| ") == len(result["rows"]) + 1 and f"only the first {CONTEXT}" in stdout
    assert (out / "longppl.png").read_bytes()[:8] == PNG


def test_window_rows_run_past_the_context(report):
    """Window rows (with and without sinks) score all 400 tokens, past the tiny model's context of 160."""
    rows = rows_by_label(report[1])
    for label in ("window 32", "window 32 + 4 sinks", "window 64", "window 64 + 4 sinks"):
        r = rows[label]
        assert "error" not in r, r
        assert r["scored"] == 399 and len(r["buckets"]) == 8
        assert np.isfinite([r["ppl"], r["ppl_context"], r["ppl_after_eviction"], r["ppl_past_context"]]).all()


def test_h2o_rows_score_up_to_the_context(report):
    """H2O keeps RoPE at each key's own position: like dense it scores the model's context, and it
    evicts (its perplexity is not dense's)."""
    rows = rows_by_label(report[1])
    for label in ("h2o 32 (16 recent)", "h2o 64 (32 recent)"):
        r = rows[label]
        assert "error" not in r, r
        assert r["scored"] == CONTEXT - 1 and r["ppl_past_context"] is None and np.isfinite(r["ppl"])
        assert r["ppl"] != rows["dense"]["ppl"]


def test_refused_policy_is_not_available(tiny):
    bogus = longppl.Policy("bogus", (("no_such_argument", 1),), 32)
    result = longppl.evaluate(tiny / "tiny.bin", TEXT, 100, [longppl.DENSE, bogus], chunk=32, threads=1, bucket=50)
    assert result["rows"][1]["error"].startswith("not available") and "error" not in result["rows"][0]
    assert "not available" in longppl.format_table(result)


def test_no_eviction_equals_dense(tiny):
    """A window + sinks that holds every token never evicts: the same perplexity as the dense cache."""
    policy = longppl.policies([96], sinks=4, h2o_recent=0)[2]
    result = longppl.evaluate(tiny / "tiny.bin", TEXT, 100, [longppl.DENSE, policy], chunk=16, threads=1)
    dense, windowed = result["rows"]
    assert "error" not in windowed, windowed
    assert windowed["ppl"] == pytest.approx(dense["ppl"], rel=1e-4) and windowed["ppl_after_eviction"] is None


@pytest.mark.parametrize("args, message", [
    (["--window", "30"], "multiples of 16"),
    (["--window", "32,x"], "comma-separated list"),
    (["--tokens", "1"], "--tokens must be at least 2"),
    (["--chunk", "0"], "--chunk must be at least 1"),
    (["--sinks", "-1"], "--sinks must be at least 0"),
    (["--window", "32", "--h2o", "32"], "--h2o must lie in 0..31"),
])
def test_bad_arguments_are_one_line_errors(tiny, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        longppl.parse_args([str(tiny / "tiny.bin"), *args])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_too_short_text_is_an_error(tiny, capsys):
    assert longppl.main([str(tiny / "tiny.bin"), "--text", str(tiny / "text.txt"), "--tokens", "5000",
                         "--out", str(tiny / "short")]) == 1
    assert "asked for 5000" in capsys.readouterr().err


def test_long_generation_stays_bounded(tiny):
    """kvc.bench.window generates past the context with a window: a mark per interval and a table."""
    result = window.run_window(tiny / "tiny.bin", window=32, tokens=300, every=100, threads=1)
    assert "error" not in result, result
    assert [m["tokens"] for m in result["marks"]] == [100, 200, 300]
    assert result["marks"][-1]["position"] == result["prompt_tokens"] + 300 > CONTEXT
    assert result["ms_ratio"] >= 1 and result["rss_growth_mb"] is not None
    assert window.format_table(result).count("\n| ") == 4


def test_flatness_counts_intervals_after_the_window_fills():
    marks = [{"position": p, "ms_per_token": ms, "rss_mb": rss}
             for p, ms, rss in ((100, 1.0, 50), (200, 3.0, 60), (300, 2.0, 61), (400, 4.0, 62))]
    assert window.flatness(marks, 150) == {"ms_ratio": 2.0, "rss_growth_mb": 1.0}  # the last two intervals
    assert window.flatness(marks, 1000) == {"ms_ratio": None, "rss_growth_mb": None}


def test_bench_part(tiny, tmp_path, monkeypatch):
    """make bench's long-context part: both measurements into results, their tables and one PNG."""
    from kvc.bench import suite, tables
    from kvc.bench.plot import plot_long_context
    from kvc.bench.workload import QUICK, QUICK_CACHE, LongSizes
    monkeypatch.setattr(suite, "default_text", lambda chars=None: TEXT)
    sizes = LongSizes(tokens=200, windows=[32], generate=60, every=30, window=32)
    plan = suite.Plan(models={"f32": tiny / "tiny.bin"}, threads=[1], sizes=QUICK, mode="test", parts=("long-context",),
                      cache_sizes=QUICK_CACHE, long_sizes=sizes)
    results = suite.run_bench(plan)
    lc = results["long_context"]
    assert lc["dtype"] == "f32" and lc["perplexity"]["tokens"] == 200 and len(lc["generation"]["marks"]) == 2
    text = tables.markdown_tables(results)
    assert "Bounded KV caches past the model's context" in text and "| window 32 + 4 sinks |" in text
    assert plot_long_context(lc["perplexity"], tmp_path / "lc.png", lc["generation"]) is None
    assert (tmp_path / "lc.png").read_bytes()[:8] == PNG


def test_bench_sizes():
    """--quick picks the quick long-context sizes; --long-tokens and --long-generate override either."""
    from kvc.bench.__main__ import long_sizes_from_args, parser
    from kvc.bench.workload import FULL_LONG, QUICK_LONG
    assert long_sizes_from_args(parser().parse_args(["--quick"])) == QUICK_LONG
    full = long_sizes_from_args(parser().parse_args(["--long-tokens", "4096", "--long-generate", "100"]))
    assert (full.tokens, full.generate, full.windows, full.window) == (4096, 100, FULL_LONG.windows, 1024)
