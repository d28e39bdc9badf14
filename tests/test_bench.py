"""kvc.bench's measurements run and report sane structure on a tiny random model (no timing thresholds).

In-process models open with the engine's default thread count. A count given to one model affects
no other (run.c's parallel regions take each model's own count), so nothing here leaks into the
tests that run after these.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import kvc
from kvc import format as fmt
from kvc.bench import cache_types, files, kvc_run, logit_quality, machine, no_cache, tables, traffic
from kvc.bench.bandwidth import measure_bandwidth
from kvc.bench.child import run_cache_child
from kvc.bench.plot import plot, plot_cache
from kvc.bench.workload import CacheSizes, Sizes
from helpers import write_random_model

TINY = Sizes(prefill=[8, 24], decode=6, positions=[0, 16, 40], steps=3, repeats=1, prompt=5)
# the random model's context is 160: position 160 is measured at 160 - steps
TINY_CACHE = CacheSizes(positions=[0, 16, 64, 160], steps=3, no_cache=[2, 4, 8],
                        no_cache_prompt=3, threads=1, paired=[64, 160], paired_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model.bin"
    write_random_model(path, seed=3, n_heads=4, n_kv_heads=2)
    return path


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny model whose heads hold 32 values: the quantized cache types' group."""
    path = tmp_path_factory.mktemp("bench") / "model32.bin"
    write_random_model(path, seed=5, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2)
    return path


def test_measurements(tiny):
    m = kvc.Model(tiny, seq_len=TINY.seq_len)
    toks = kvc_run.text_tokens(m, TINY.seq_len)
    assert len(toks) == TINY.seq_len and all(0 <= t < m.config.vocab_size for t in toks)
    pre = kvc_run.measure_prefill(m, toks[:24], repeats=2)
    assert pre["tokens"] == 24 and pre["seconds"] > 0 and pre["tok_s"] > 0
    dec = kvc_run.measure_decode(m, toks[:5], 6)
    assert dec["tokens"] == 6 and dec["start_pos"] == 5 and dec["tok_s"] > 0
    rows = kvc_run.measure_decode_by_position(m, [0, 16, 40], 3, toks)
    assert [r["pos"] for r in rows] == [0, 16, 40]
    assert all(r["steps"] == 3 and r["ms_per_token"] > 0 and r["ms_mean"] > 0 for r in rows)


def test_run_one_and_tables(tiny, tmp_path):
    res = kvc_run.run_one(tiny, None, TINY)
    assert res["engine"] == "kvc" and res["dtype"] == "f32" and res["threads"] is None
    assert [p["tokens"] for p in res["prefill"]] == [8, 24]
    assert res["decode"]["tokens"] == 6 and res["decode"]["gb_s"] > 0
    assert [b["pos"] for b in res["by_position"]] == [0, 16, 40] and all(b["gb_s"] > 0 for b in res["by_position"])
    assert res["peak_rss_mb"] > 0 and res["weight_bytes_per_token"] > 0
    bw = measure_bandwidth(1, 8 << 20, repeats=1)
    assert bw["gb_s"] > 0 and bw["threads"] == 1 and bw["kernel"] in bw["by_kernel"]
    results = {"mode": "test", "machine": machine.machine_info(), "sizes": {}, "roofline": {"1": bw},
               "runs": [res, {"engine": "kvc", "dtype": "q8_0", "threads": 2, "error": "boom"}],
               "quality": {"tokens": 10, "positions": 9, "top1_agreement": 0.9, "mean_kl": 0.01, "max_kl": 0.1,
                           "ppl_ref": 5.0, "ppl_test": 5.1}}
    text = tables.markdown_tables(results)
    assert "| kvc | f32 | None |" in text and "pos 40" in text and "top-1 agreement 90.0%" in text and "boom" in text
    json.dumps(results)  # what results.json gets
    assert plot(results, tmp_path / "b.png") is None
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_child_prints_one_json_line(tiny):
    args = ["--one", str(tiny), "1", "--prefill", "8", "--decode", "4", "--positions", "0,8", "--steps", "2",
            "--repeats", "1"]
    out = subprocess.run([sys.executable, "-m", "kvc.bench"] + args, capture_output=True, text=True, timeout=60,
                         cwd=files.ROOT, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["threads"] == 1 and res["decode"]["tokens"] == 4 and res["peak_rss_mb"] > 0


def test_weight_bytes_per_token():
    c = fmt.Config(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)
    n_all = sum(int(np.prod(s)) for _, s in fmt.tensor_shapes(c))
    f32 = {"group_size": 0} | dict.fromkeys(fmt.MATRICES, fmt.F32)
    assert traffic.weight_bytes_per_token(c, f32) == 4 * n_all  # tied: the embedding table is the classifier
    untied = fmt.Config(**{**c.__dict__, "shared_classifier": False})
    assert traffic.weight_bytes_per_token(untied, f32) == 4 * n_all + 4 * 64  # + classifier - table + one row
    n_norm = sum(int(np.prod(s)) for name, s in fmt.tensor_shapes(c) if fmt.is_norm(name))
    q8 = {"group_size": 32} | dict.fromkeys(fmt.MATRICES, fmt.Q8_0)
    assert traffic.weight_bytes_per_token(c, q8) == 4 * n_norm + (n_all - n_norm) * (1 + 4 / 32)
    q4_1 = {**dict.fromkeys(fmt.MATRICES, fmt.Q4_1), "group_size": 32, "tok_embeddings": fmt.Q8_0, "wcls": fmt.Q8_0}
    n_embed = 300 * 64
    assert traffic.weight_bytes_per_token(c, q4_1) == \
        4 * n_norm + n_embed * (1 + 4 / 32) + (n_all - n_norm - n_embed) * (0.5 + 4 / 32)
    assert traffic.kv_bytes_read(c, 0) == 2 * 2 * 1 * 32 * 4


def test_quality(tiny, tmp_path):
    same = logit_quality.quality(tiny, tiny, max_tokens=100)
    assert same["tokens"] == 100 and same["positions"] == 99
    assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-9 and same["ppl_ref"] == same["ppl_test"]
    other = tmp_path / "other.bin"
    write_random_model(other, seed=4, n_heads=4, n_kv_heads=2)
    diff = logit_quality.quality(tiny, other, max_tokens=100)
    assert 0 <= diff["top1_agreement"] < 1 and diff["mean_kl"] > 0 and diff["max_kl"] >= diff["mean_kl"]


def test_compare_logits_known_values():
    ref = np.log(np.array([[0.5, 0.25, 0.25]], dtype=np.float32))
    test = np.log(np.array([[0.25, 0.5, 0.25]], dtype=np.float32))
    r = logit_quality.compare_logits(ref, test, np.array([0]))
    assert r["top1_agreement"] == 0.0
    assert r["mean_kl"] == pytest.approx(0.5 * np.log(2) - 0.25 * np.log(2), rel=1e-6)
    assert r["ppl_ref"] == pytest.approx(2.0) and r["ppl_test"] == pytest.approx(4.0)
    with pytest.raises(ValueError):
        logit_quality.compare_logits(ref, test[:, :2])


def test_cache_options_and_positions():
    assert cache_types.cache_options("q8_0") == {"cache_type_k": "q8_0", "cache_type_v": "q8_0", "cache_rotate": False}
    assert cache_types.cache_options("q4_0+rot")["cache_rotate"] is None  # the type's default: rotated
    with pytest.raises(ValueError):
        cache_types.cache_options("q4_0+spin")
    assert cache_types.clamp_positions([0, 4096, 8192], 16, 8192) == [(0, 0), (4096, 4096), (8192, 8176)]
    assert cache_types.clamp_positions([0, 8, 10], 4, 12) == [(0, 0), (8, 8)]  # 10 -> 8 collides: dropped
    c = fmt.Config(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)
    assert traffic.kv_bytes_read(c, 0, "q8_0", "q4_0") == 2 * (34 + 18)  # kv_dim 32: one block each, 2 layers
    assert traffic.kv_bytes_read(c, 3, "f16", "bf16") == 2 * 4 * 2 * (2 * 32)


@pytest.mark.parametrize("cache", ["f32", "q8_0", "q4_0+rot"])
def test_run_one_cache(tiny32, cache):
    res = cache_types.run_one_cache(tiny32, 1, cache, TINY_CACHE)
    assert res["cache"] == cache and res["dtype"] == "f32" and res["context"] == 160
    assert res["cache_type_k"] == res["cache_type_v"] == cache.split("+")[0]
    assert res["cache_rotate"] == cache.endswith("+rot")
    rows = res["by_position"]
    assert [(b["asked"], b["pos"]) for b in rows] == [(0, 0), (16, 16), (64, 64), (160, 157)]
    assert all(b["ms_per_token"] > 0 and b["rss_mb"] > 0 and b["gb_s"] > 0 for b in rows)
    paired = res["paired"]  # 160 passes the context with its span of 64: measured at 96
    assert paired["steps"] == 3 and [(p["asked"], p["pos"]) for p in paired["rows"]] == [(0, 0), (64, 64), (160, 96)]
    assert paired["rows"][0]["ratio"] == 1
    assert all(p["ms_q1"] <= p["ms"] <= p["ms_q3"] and p["ratio_low"] <= p["ratio"] <= p["ratio_high"] for p in paired["rows"])
    vs = paired["vs_f32"]  # the f32 cache is the reference itself
    assert vs is None if cache == "f32" else vs["ratio_low"] <= vs["ratio"] <= vs["ratio_high"] and vs["f32_ms"] > 0
    mem = res["memory"]
    assert mem["total"] == mem["weights"] + mem["kv_cache"] + mem["scratch"] and mem["kv_cache"] > 0
    json.dumps(res)


def test_paired_on_a_context_shorter_than_its_span(tmp_path):
    """A model whose context is shorter than the paired span is measured over all of it: position 0
    only (every asked position lands there), against the f32 cache."""
    path = tmp_path / "short.bin"
    write_random_model(path, seed=6, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, seq_len=24)
    res = cache_types.measure_paired(path, 1, "q8_0", [16, 2048], 3, list(range(1, 30)), 24)
    assert res["span"] == 24 and [(r["asked"], r["pos"]) for r in res["rows"]] == [(0, 0)]
    assert res["vs_f32"]["f32_ms"] > 0


def test_cache_summary():
    def rec(cache: str, ratios: list[float], vs_f32: float | None) -> dict:
        rows = [{"asked": a, "pos": min(a, 8128), "ms": 10 * r, "ratio": r, "ratio_low": r - 0.1, "ratio_high": r + 0.1}
                for a, r in zip([0, 2048, 8192], ratios)]
        vs = None if vs_f32 is None else {"ratio": vs_f32, "ratio_low": 1.0, "ratio_high": 1.1, "f32_ms": 9.5}
        return {"dtype": "q8_0", "cache": cache, "paired": {"steps": 9, "rows": rows, "vs_f32": vs}}

    s = cache_types.cache_summary([rec("f32", [1, 2, 5], None), rec("q8_0", [1, 1.2, 2], 1.05),
                                   {"dtype": "q8_0", "cache": "q4_0", "error": "boom"}])
    assert [x["cache"] for x in s] == ["f32", "q8_0"]
    assert s[1]["ratio_2048"] == pytest.approx(1.2) and s[1]["ratio_last"] == pytest.approx(2.0)
    assert s[1]["ratio_2048_spread"] == pytest.approx([1.1, 1.3]) and s[0]["ratio_last_spread"] == pytest.approx([4.9, 5.1])
    assert s[1]["last_asked"] == 8192 and s[1]["last_pos"] == 8128
    assert s[0]["short_vs_f32"] is None and s[1]["short_vs_f32"] == 1.05 and s[1]["short_vs_f32_spread"] == [1.0, 1.1]
    assert s[1]["short_ms"] == 10


def test_no_cache_curve(tiny):
    m = kvc.Model(tiny, seq_len=16)
    curve = no_cache.cost_curve(m, [1, 2, 3], [2, 4, 8])
    assert curve["lengths"] == [2, 4, 8] and [t["tokens"] for t in curve["totals"]] == [2, 4, 8]
    assert curve["positions"] == list(range(3, 11)) and len(curve["cache_ms"]) == len(curve["no_cache_ms"]) == 8
    assert all(t["cache_s"] > 0 and t["no_cache_s"] > 0 for t in curve["totals"])
    assert curve["totals"][0]["cache_s"] < curve["totals"][-1]["cache_s"]  # sums of more steps
    assert isinstance(curve["exponent_cache"], float) and isinstance(curve["exponent_no_cache"], float)
    assert curve["same_tokens"] is True and curve["first_difference"] is None  # the same greedy text
    assert no_cache.growth_exponent([10, 20, 40], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert no_cache.growth_exponent([10, 20, 40], [3.0, 6.0, 12.0]) == pytest.approx(1.0)
    assert no_cache.growth_exponent([10], [1.0]) is None


def test_cache_children_tables_and_plot(tiny32, tmp_path):
    """The cache parts through their child processes, into results, tables and cache.png."""
    records = [run_cache_child(tiny32, 1, c, TINY_CACHE, timeout=120) for c in ("f32", "q4_0")]
    records.append(run_cache_child(tiny32, 1, "q5_9", TINY_CACHE, timeout=120))
    assert all("error" not in r for r in records[:2]) and "error" in records[2]
    records[2].update(dtype="f32", cache="q5_9")
    nc = run_cache_child(tiny32, 1, None, TINY_CACHE, timeout=120)
    assert nc["lengths"] == [2, 4, 8] and nc["prompt"] == 3 and nc["peak_rss_mb"] > 0
    results = {"mode": "test", "machine": machine.machine_info(), "runs": [],
               "cache_sizes": {"threads": 1}, "cache_types": records,
               "cache_summary": cache_types.cache_summary(records), "no_cache": nc}
    text = tables.markdown_tables(results)
    assert "| f32 | q4_0 |" in text and "pos 160 (at 157)" in text and "RSS @ 64" in text
    assert "× pos 160 / 0 (at 96)" in text and "for 3 rounds" in text
    assert "q5_9 cache failed" in text and "log-log least-squares slope" in text
    json.dumps(results)
    assert plot_cache(results, tmp_path / "c.png") is None
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kv_quality_part(tiny32):
    """The kv-quality part scores every cache setup against the f32 cache into results and a table,
    and says why when it cannot run (no f32 model)."""
    from kvc.bench.suite import Plan, run_bench
    from kvc.bench.workload import QUICK, QUICK_CACHE
    from kvc.kvquality import SETUPS
    plan = Plan(models={"f32": tiny32}, threads=[1], sizes=QUICK, mode="test", parts=("kv-quality",),
                cache_sizes=QUICK_CACHE, kv_quality_chunks=1, kv_quality_ctx=64)
    results = run_bench(plan)
    kq = results["kv_quality"]
    assert kq["chunks"] == 1 and kq["ctx"] == 64 and len(kq["rows"]) == 1 + len(SETUPS) and "runs" in results
    assert kq["rows"][0]["mean_kl"] == 0 and all(r["mean_kl"] >= 0 for r in kq["rows"])
    assert "KV cache quality against the f32 cache" in tables.markdown_tables(results)
    plan.models = {"q8_0": tiny32}
    assert "needs the f32 model" in run_bench(plan)["kv_quality"]["error"]


FAKE_LLAMA_BENCH = """#!{python}
# llama-bench's -o json for the -p and -n it is given: pp at 100 tok/s, tg at 10 tok/s; logs its args
import json, sys
args = sys.argv[1:]
open({log!r}, "a").write(" ".join(args) + "\\n")
prompts = [int(x) for x in args[args.index("-p") + 1].split(",") if int(x)]
gen = int(args[args.index("-n") + 1])
recs = [dict(n_prompt=p, n_gen=0, avg_ts=100.0, build_commit="fake") for p in prompts]
recs += [dict(n_prompt=0, n_gen=gen, avg_ts=10.0, build_commit="fake")] if gen else []
print(json.dumps(recs))
"""


def test_parse_llama_bench():
    from kvc.bench.side_by_side import parse_llama_bench
    text = json.dumps([{"n_prompt": 128, "n_gen": 0, "avg_ts": 42.5}, {"n_prompt": 0, "n_gen": 256, "avg_ts": 7.0},
                       {"n_prompt": 0, "n_gen": 0, "avg_ts": 1.0}])
    assert parse_llama_bench(text) == {"pp128": 42.5, "tg256": 7.0}
    with pytest.raises(ValueError):
        parse_llama_bench("[]")


def test_side_by_side_alternates_and_reports(tiny, tmp_path, monkeypatch):
    """Both engines measured in alternating order each round, every figure kept per engine, the
    ratio of medians in the table, the busy-core rounds on the most threads, llama-bench's arguments
    as given (a fake llama-bench stands in for `make peer`'s)."""
    from kvc.bench import side_by_side
    log = tmp_path / "llama.log"
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    monkeypatch.setattr(side_by_side, "peer_binary", lambda name: fake)
    monkeypatch.setattr(side_by_side, "contenders", lambda models, gguf: ({"f32": (tiny, tmp_path / "m.gguf")}, []))
    said = []
    sizes = side_by_side.SideSizes(prefill=[8, 16], decode=6, busy_decode=4, rounds=2)
    side = side_by_side.run_side_by_side({"f32": tiny}, [1, 2], sizes, None, 120, said.append)
    assert not side["errors"], side["errors"]
    rows = {(r["dtype"], r["threads"], r["test"]): r for r in side["rows"]}
    assert set(rows) == {("f32", t, test) for t in (1, 2) for test in ("pp8", "pp16", "tg6")} | {("f32", 2, "tg4 busy")}
    for r in rows.values():
        assert len(r["kvc"]) == 2 and len(r["llama.cpp"]) == 2 and all(x > 0 for x in r["kvc"])
        assert r["llama.cpp"] == ([10.0] * 2 if r["test"].startswith("tg") else [100.0] * 2)
    assert [s.endswith("(kvc then llama.cpp)...") for s in said] == [True, True, False, False, True, False]
    calls = log.read_text().splitlines()
    assert len(calls) == 6 and all("-ctk f16 -ctv f16" in c and "-r 1" in c for c in calls)
    assert sum("-p 0 -n 4" in c and "-t 2" in c for c in calls) == 2
    assert [u["busy"] for u in side["thread_use"]] == [False] * 4 + [True] * 2
    table = "\n".join(tables.side_by_side_table(side))
    pp8 = side_by_side.summarize(rows[("f32", 1, "pp8")])
    assert f"| f32 | 1 | pp8 | {pp8['kvc'][0]:,.1f} (" in table and f"| {pp8['ratio']:,.2f} |" in table
    assert "f32: decode with one core busy over the same engine's idle 1-thread decode" in table


def test_side_by_side_without_llama_bench(tiny, monkeypatch):
    from kvc.bench import side_by_side

    def missing(name):
        raise FileNotFoundError(f"no {name}: run `make peer`")
    monkeypatch.setattr(side_by_side, "peer_binary", missing)
    side = side_by_side.run_side_by_side({"f32": tiny}, [1], side_by_side.QUICK_SIDE, None, 60, print)
    assert side == {"error": "skipped: no llama-bench: run `make peer`"}
    assert tables.side_by_side_table(side) == ["", "kvc beside llama.cpp: skipped: no llama-bench: run `make peer`"]


def test_side_by_side_plot(tmp_path):
    from kvc.bench.plot import plot_side_by_side
    results = {"machine": {"cpu": "cpu", "usable_cores": 2, "date": "today"},
               "side_by_side": {"rows": [{"dtype": "q8_0", "threads": 2, "test": "tg64", "kvc": [2.0, 3.0], "llama.cpp": [1.0]},
                                         {"dtype": "q8_0", "threads": 2, "test": "tg64 busy", "kvc": [2.0], "llama.cpp": []}]}}
    assert plot_side_by_side(results, tmp_path / "s.png") is None
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serving_bench_smoke(tiny, tmp_path, capsys):
    """kvc.bench.serving on the tiny model: the paged pool wastes less than contiguous reservations,
    the prefix cache holds fewer blocks and computes fewer prompt tokens, the server streams give
    tok/s, a time to first token and exactly max_tokens tokens each (ignore_eos); llama-server gets
    -c = np * context and the same threads; the command line prints the three tables and saves them."""
    from kvc import Model
    from kvc.bench import serving

    lengths = serving.mix_lengths(6, 10, 150)
    assert len(lengths) == 6 and all(10 <= p + r <= 150 and p >= 1 and r >= 1 for p, r in lengths)
    with Model(tiny, seq_len=16, threads=1) as model:
        w = serving.memory_waste(model, lengths, reserve=150, block_size=8, threads=1)
        paged, reserved, whole = w["rows"]
        assert w["tokens_held"] > 0 and w["token_bytes"] <= paged["allocated"] < reserved["allocated"]
        assert 0 <= paged["waste_pct"] < reserved["waste_pct"] < whole["waste_pct"] and w["context"] == 160
        s = serving.prefix_sharing(model, requests=3, system_tokens=32, user_tokens=4, max_tokens=2, block_size=8,
                                   threads=1)
        off, on = s["rows"]
        assert on["blocks_peak"] < off["blocks_peak"] and on["bytes_peak"] < off["bytes_peak"]
        assert on["computed"] == 3 * 36 - 2 * 32 and off["computed"] == 3 * 36
    sizes = serving.ServingSizes(levels=[1, 2], max_tokens=4, rounds=1, context=64)
    tp = serving.serving_throughput({"tiny": str(tiny)}, sizes, threads=1)
    assert not tp["errors"], tp["errors"]
    assert [(r["engine"], r["streams"]) for r in tp["runs"]] == [("kvc", 1), ("kvc", 2)]
    for r in tp["runs"]:
        assert r["tokens"] == [4] * r["streams"] and r["tok_s"] > 0 and r["ttft_s"] and all(t > 0 for t in r["ttft_s"])
    rows = serving.summarize(tp)["tiny"]
    assert rows[0]["kvc"]["speedup"] == 1.0 and rows[0]["kvc"]["ttft_ms"] > 0 and rows[1]["ratio"] is None
    table = "\n".join(serving.throughput_tables(tp))
    assert "| streams | kvc tok/s | kvc TTFT ms | kvc vs 1 stream | kvc tokens | llama-server tok/s |" in table
    assert "| 2 | " in table and "no llama-server" in table
    argv = serving.llama_server_argv("llama-server", "m.gguf", 8080, 8, 2, 512)
    assert argv[argv.index("-c") + 1] == "4096" and argv[argv.index("-np") + 1] == "8"
    assert argv[argv.index("-t") + 1] == argv[argv.index("-tb") + 1] == "2" and "--cont-batching" in argv
    assert serving.main([str(tiny), "--quick", "--no-peer", "--context", "64", "--requests", "3", "--min-len", "10",
                         "--max-len", "100", "--reserve", "150", "--shared", "24", "--sharers", "2", "--levels", "1",
                         "--max-tokens", "2", "-t", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| KV cache |") == 1 and out.count("| prefix cache |") == 1 and out.count("| streams |") == 1
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert {"memory", "sharing", "throughput"} <= set(saved) and (tmp_path / "serving.md").read_text().strip() in out


def test_serving_part_of_the_bench(tiny, monkeypatch):
    """`make bench`'s serving part: results["serving"] with its three measurements and tables, kvc alone
    (with a note) where llama-server is not built."""
    from kvc.bench import suite
    from kvc.bench.serving import ServingSizes
    from kvc.bench.workload import QUICK, QUICK_CACHE

    def missing(name):
        raise FileNotFoundError(f"no {name}: run `make peer`")
    monkeypatch.setattr(suite, "peer_binary", missing)
    sizes = ServingSizes(levels=[1], max_tokens=2, rounds=1, context=64, requests=3, min_len=10, max_len=100,
                         reserve=150, sharers=2, shared=24, answer=2)
    plan = suite.Plan(models={"f32": tiny}, threads=[1], sizes=QUICK, mode="test", parts=("serving",),
                      cache_sizes=QUICK_CACHE, serving_sizes=sizes)
    results = suite.run_bench(plan)
    sv = results["serving"]
    assert {"memory", "sharing", "throughput"} <= set(sv) and not sv["throughput"]["errors"]
    assert sv["notes"] == ["no llama-server: no llama-server: run `make peer`"]
    text = tables.markdown_tables(results)
    assert "| KV cache |" in text and "| prefix cache |" in text and "| 1 | " in text and "note: no llama-server" in text
    json.dumps(results)


def test_size_options_override_presets_and_refuse_bad_numbers(capsys):
    """Both bench commands read their sizes with the same types: lists and counts replace the preset's
    fields (a copy; the preset's lists stay as they were), 0 only where it means none, and a bad number
    is argparse's one-line error (exit 2), not a traceback."""
    from kvc.bench import __main__ as bench, serving
    from kvc.bench.workload import FULL_CACHE, QUICK

    a = bench.parser().parse_args(["--quick", "--prefill", "64,256", "--cache-positions", "0,2048", "--paired", "1024",
                                   "--side-busy-decode", "0"])
    assert bench.sizes_from_args(a).prefill == [64, 256] and bench.sizes_from_args(a).decode == QUICK.decode
    assert bench.cache_sizes_from_args(a).positions == [0, 2048] and bench.side_sizes_from_args(a).busy_decode == 0
    assert a.threads == [1, 2] and bench.sizes_from_args(bench.parser().parse_args([])).prefill == [128, 512]
    cache = bench.cache_sizes_from_args(bench.parser().parse_args(["--paired", "512"]))
    assert cache.paired == [512] and FULL_CACHE.paired == [2048, 8192]
    s = serving.serving_sizes(serving.parser().parse_args(["--quick", "--levels", "1,3", "--reserve", "100"]))
    assert s.levels == [1, 3] and s.reserve == 100 and s.max_tokens == serving.QUICK_SERVING.max_tokens
    for parser, argv, message in [
            (bench.parser, ["--prefill", "abc"], "argument --prefill: 'abc' is not a whole number of at least 1"),
            (bench.parser, ["--decode", "0"], "argument --decode: '0' is not a whole number of at least 1"),
            (bench.parser, ["--cache-positions", "0,-5"], "'-5' is not a whole number of at least 0"),
            (bench.parser, ["--threads", ","], "argument --threads: ',' holds no numbers"),
            (serving.parser, ["--levels", "1,x"], "argument --levels: 'x' is not a whole number of at least 1"),
            (serving.parser, ["--rounds", "0"], "argument --rounds: '0' is not a whole number of at least 1")]:
        with pytest.raises(SystemExit) as e:
            parser().parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], err
