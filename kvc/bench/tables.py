"""The README's markdown tables from a results dict: kvc beside llama.cpp; throughput, ms/token by
position, Q8_0 quality; each KV cache type's ms/token and memory as the cache fills; generating with
and without the cache; perplexity and decode cost with bounded KV caches past the model's context."""
from __future__ import annotations

from .. import longppl
from ..kvquality import format_table
from . import markdown, window
from .serving import serving_tables
from .side_by_side import summarize


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"



def _config(run: dict) -> list[str]:
    """The cells naming a configuration: engine, dtype, threads."""
    return [run["engine"], run.get("dtype", "?"), str(run["threads"])]


def _heading(results: dict) -> list[str]:
    m = results["machine"]
    return [f"Measured {m['date']} on {m['cpu']}, {m['usable_cores']} cores"
            f"{' (AVX-512)' if m.get('avx512') else ''}, {m['memory_gb']} GB RAM, kvc {m.get('kvc_commit') or '?'}"
            f" ({results['mode']} run; load average before: {', '.join(map(str, m['load_avg_before']))}).",
            "Other CPU %: the share of the machine's CPU that other processes (or the hypervisor) took"
            " during that run; rows where it is high are not to be trusted."]


def _throughput(runs: list[dict], roofline: dict) -> list[str]:
    """Prefill and decode tok/s, decode GB/s against the roofline, peak RSS, other CPU %."""
    pre_lens = sorted({p["tokens"] for r in runs for p in r["prefill"]})
    head = (["engine", "dtype", "threads"] + [f"prefill {n} tok/s" for n in pre_lens]
            + ["decode tok/s", "decode GB/s", "read GB/s (roofline)", "% of roofline", "peak RSS MB",
               "other CPU %"])
    rows = []
    for r in runs:
        pre = {p["tokens"]: p["tok_s"] for p in r["prefill"]}
        gb = r["decode"].get("gb_s")
        rf = roofline.get(str(r["threads"]), {}).get("gb_s")
        pct = 100 * gb / rf if gb and rf else None
        rows.append(_config(r) + [_fmt(pre.get(n)) for n in pre_lens]
                    + [_fmt(r["decode"]["tok_s"]), _fmt(gb), _fmt(rf), _fmt(pct, 0), _fmt(r["peak_rss_mb"], 0),
                       _fmt(r.get("other_cpu_pct"), 0)])
    return markdown.table(head, rows)


def _by_position(runs: list[dict]) -> list[str]:
    """ms/token at each cache position, and the effective GB/s at the last one; nothing without positions."""
    positions = sorted({b["pos"] for r in runs for b in r["by_position"]})
    if not positions:
        return []
    head = ["engine", "dtype", "threads"] + [f"pos {p}" for p in positions] + [f"GB/s @ {positions[-1]}"]
    rows = []
    for r in runs:
        bp = {b["pos"]: b for b in r["by_position"]}
        last = bp.get(positions[-1], {})
        rows.append(_config(r) + [_fmt(bp[p]["ms_per_token"], 2) if p in bp else "-" for p in positions]
                    + [_fmt(last.get("gb_s"))])
    return ["", "Decode ms/token (median) with the cache filled to each position "
            "(effective GB/s at the last position in the last column):", ""] + markdown.table(head, rows)


def _notes(results: dict) -> list[str]:
    """Q8_0's quality and failed configurations."""
    lines = []
    q = results.get("quality")
    if q and "error" not in q:
        lines += ["", f"Q8_0 vs f32 on {q['tokens']} tokens of fixed English text: top-1 agreement "
                  f"{100 * q['top1_agreement']:.1f}%, mean KL {q['mean_kl']:.4f} nats (max {q['max_kl']:.3f}), "
                  f"perplexity {q['ppl_ref']:.2f} (f32) vs {q['ppl_test']:.2f} (q8_0)."]
    elif q:
        lines += ["", f"Q8_0 quality: {q['error']}"]
    for r in results["runs"]:
        if "error" in r:
            lines += ["", f"{r.get('engine', '?')} {r.get('dtype', '?')} {r.get('threads', '?')} threads failed: {r['error']}"]
    return lines


def _spread(stats: tuple[float, float, float] | None, digits: int = 1) -> str:
    """A figure with its spread in brackets: (value, low, high), or "-"."""
    return "-" if stats is None else f"{stats[0]:,.{digits}f} ({stats[1]:,.{digits}f}-{stats[2]:,.{digits}f})"


def side_by_side_table(side: dict) -> list[str]:
    """kvc and llama.cpp per (weights, threads, test): median tok/s (min-max) and the ratio of the
    medians; then the busy-core figure against kvc's idle 1-thread decode, and what went wrong."""
    if "error" in side:
        return ["", f"kvc beside llama.cpp: {side['error']}"]
    head = ["weights", "threads", "test", "kvc tok/s", "llama.cpp tok/s", "kvc / llama.cpp"]
    rows, by_key = [], {}
    for r in side["rows"]:
        s = summarize(r)
        by_key[(r["dtype"], r["threads"], r["test"])] = s
        rows.append([r["dtype"], str(r["threads"]), r["test"], _spread(s["kvc"]), _spread(s["llama.cpp"]),
                     _fmt(s["ratio"], 2)])
    sizes = side["sizes"]
    lines = ["", f"kvc beside llama.cpp (llama-bench, build {side['llama_build']}) on the same weights, measured "
             f"alternately, {side['rounds']} round(s); median tok/s (min-max); ppN: an N-token prompt, tgN: N tokens "
             f"decoded, both from an empty cache; f16 K/V cache in both; busy: another process spins on one core. "
             f"Load average {', '.join(map(str, side['load_before']))} before, {', '.join(map(str, side['load_after']))} "
             f"after ({side['seconds']:.0f} s). The ratios are the figures that count.", ""] + markdown.table(head, rows)
    busy = f"tg{sizes['busy_decode']} busy"
    for dtype in dict.fromkeys(r["dtype"] for r in side["rows"]):
        hot = [s for (d, _, test), s in by_key.items() if d == dtype and test == busy]
        idle = by_key.get((dtype, 1, f"tg{sizes['decode']}"))
        if hot and idle:
            parts = [f"{e} {hot[0][e][0] / idle[e][0]:.2f}x" for e in ("kvc", "llama.cpp") if hot[0][e] and idle[e]]
            lines += ["", f"{dtype}: decode with one core busy over the same engine's idle 1-thread decode: "
                      + ", ".join(parts) + "."]
    for note in side.get("notes", []) + side.get("errors", []):
        lines += ["", note]
    return lines


def _position_heads(records: list[dict]) -> tuple[list[int], dict[int, int]]:
    """The asked positions of the cache records, and where each was measured when that differs."""
    asked = sorted({b["asked"] for r in records for b in r["by_position"]})
    moved = {b["asked"]: b["pos"] for r in records for b in r["by_position"] if b["pos"] != b["asked"]}
    return asked, moved


def _cache_latency(records: list[dict], summary: list[dict], threads: int) -> list[str]:
    """ms/token at each position per (weights, cache) configuration, then the paired measurement's
    ratios to position 0 and its short-context decode against the same weights' f32 cache."""
    asked, moved = _position_heads(records)
    if not asked:
        return []
    by_config = {(s["dtype"], s["cache"]): s for s in summary}
    last = next((s["last_asked"] for s in summary if s.get("last_asked")), None)
    moved_last = next((s["last_pos"] for s in summary if s.get("last_asked") and s["last_pos"] != s["last_asked"]), None)
    head = (["weights", "KV cache"] + [f"pos {p}" + (f" (at {moved[p]})" if p in moved else "") for p in asked]
            + ["× pos 2048 / 0", f"× pos {last or '-'} / 0" + (f" (at {moved_last})" if moved_last else ""),
               "short ms/token", "× f32 cache", "other CPU %"])
    rows = []
    for r in records:
        bp = {b["asked"]: b["ms_per_token"] for b in r["by_position"]}
        s = by_config.get((r["dtype"], r["cache"]), {})
        rows.append([r["dtype"], r["cache"]] + [_fmt(bp.get(p), 2) for p in asked]
                    + [_ratio(s, "ratio_2048"), _ratio(s, "ratio_last"), _fmt(s.get("short_ms"), 2),
                       _ratio(s, "short_vs_f32"), _fmt(r.get("other_cpu_pct"), 0)])
    steps = records[0]["by_position"][0]["steps"]
    paired = records[0].get("paired", {})
    return ["", f"Decode ms/token (median of {steps} steps, {threads} threads) with the KV cache filled to each "
            f"position, per cache type (K and V; +rot: Hadamard-rotated, q4_0's default). The columns after "
            f"them come from a separate paired run, one model at each position (and one with the f32 cache "
            f"at position 0) decoding a token each in turn for {paired.get('steps', '-')} rounds: × pos: "
            f"decode time there over position 0's; short: ms/token at positions 1-{paired.get('span', 64) - 1}; "
            f"× f32 cache: that over the same weights' f32 cache at the same positions (ratios of medians, "
            f"in brackets the ratios of the quartiles):", ""] + markdown.table(head, rows)


def _ratio(summary: dict, key: str) -> str:
    """A cache summary's paired ratio with its quartile spread, or "-"."""
    ratio, spread = summary.get(key), summary.get(f"{key}_spread")
    return "-" if ratio is None else _spread((ratio, *spread), 2)


def _cache_memory(records: list[dict]) -> list[str]:
    """Model.memory() and the process's RSS after filling the cache to each position, per configuration."""
    asked, moved = _position_heads(records)
    head = (["weights", "KV cache", "cache MB (allocated)", "memory() total MB"]
            + [f"RSS @ {p}" + (f" (at {moved[p]})" if p in moved else "") for p in asked] + ["peak RSS MB"])
    rows = []
    for r in records:
        rss = {b["asked"]: b["rss_mb"] for b in r["by_position"]}
        mem = r["memory"]
        rows.append([r["dtype"], r["cache"], _fmt(mem["kv_cache"] / 2**20), _fmt(mem["total"] / 2**20)]
                    + [_fmt(rss.get(p), 0) for p in asked] + [_fmt(r["peak_rss_mb"], 0)])
    return ["", f"Memory per cache type (MB of 2**20) at the full context of {records[0]['context']} tokens: the "
            "cache as allocated (Model.memory()), and the process's resident set after filling the cache to "
            "each position (the cache is allocated up front; its pages become resident as positions fill):",
            ""] + markdown.table(head, rows)


def _no_cache(nc: dict) -> list[str]:
    """Total time to generate n tokens with and without the cache, and the fitted growth exponents."""
    if "error" in nc:
        return ["", f"Generating without the cache failed: {nc['error']}"]
    rows = [[str(t["tokens"]), _fmt(t["cache_s"], 2), _fmt(t["no_cache_s"], 2), _fmt(t["speedup"], 1)]
            for t in nc["totals"]]
    first, last = nc["positions"][0], nc["positions"][-1]
    return (["", f"Generating n tokens after a {nc['prompt']}-token prompt ({nc['dtype']} weights, {nc['threads']} "
             "threads) with the KV cache, and without it (every token recomputes the whole sequence):", ""]
            + markdown.table(["n", "with cache s", "without cache s", "× slower without"], rows)
            + ["", f"Growth of total time with n (log-log least-squares slope): {_fmt(nc['exponent_cache'], 2)} "
               f"with the cache, {_fmt(nc['exponent_no_cache'], 2)} without. ms/token at positions {first} and "
               f"{last}: {_fmt(nc['cache_ms'][0], 1)} and {_fmt(nc['cache_ms'][-1], 1)} with the cache, "
               f"{_fmt(nc['no_cache_ms'][0], 1)} and {_fmt(nc['no_cache_ms'][-1], 1)} without. Same greedy tokens "
               f"both ways: " + ("yes." if nc["same_tokens"] else
                                 f"no, from step {nc.get('first_difference')} (position "
                                 f"{nc['prompt'] + (nc.get('first_difference') or 0)}) on.")])


def cache_tables(results: dict) -> list[str]:
    """The cache parts' tables (what results holds of them): latency and memory per cache type, the
    configurations that failed, and the cost without a cache."""
    lines = []
    records = results.get("cache_types", [])
    ok = [r for r in records if "error" not in r]
    if ok:
        threads = results.get("cache_sizes", {}).get("threads", ok[0]["threads"])
        lines += _cache_latency(ok, results.get("cache_summary", []), threads) + _cache_memory(ok)
    for r in records:
        if "error" in r:
            lines += ["", f"kvc {r.get('dtype', '?')} weights, {r.get('cache', '?')} cache failed: {r['error']}"]
    if "no_cache" in results:
        lines += _no_cache(results["no_cache"])
    return lines


def kv_quality_table(kq: dict) -> list[str]:
    """The kv-quality part's table (kvc.kvquality's), or the line saying why it is missing."""
    if "error" in kq:
        return ["", f"KV cache quality: {kq['error']}"]
    return ["", "KV cache quality against the f32 cache (f32 weights):", "", format_table(kq)]


def long_context_tables(lc: dict) -> list[str]:
    """The long-context part's tables (kvc.longppl's and kvc.bench.window's), or the lines saying why not."""
    ppl = lc["perplexity"]
    lines = ["", f"Bounded KV caches past the model's context ({lc['dtype']} weights), perplexity by policy:", ""]
    lines.append(f"failed: {ppl['error']}" if "error" in ppl else longppl.format_table(ppl))
    return lines + ["", "Decode speed and memory over a long generation with a window:", "",
                    window.format_table(lc["generation"])]


def markdown_tables(results: dict) -> str:
    """The README tables: kvc beside llama.cpp, throughput per configuration, ms/token by position, Q8_0
    quality, then the cache types and the cost without a cache (those of the parts that ran)."""
    runs = [r for r in results["runs"] if "error" not in r]
    lines = _heading(results)
    if "side_by_side" in results:
        lines += side_by_side_table(results["side_by_side"])
    if results["runs"]:
        lines += [""] + _throughput(runs, results.get("roofline", {})) + _by_position(runs)
    lines += _notes(results) + cache_tables(results)
    if "kv_quality" in results:
        lines += kv_quality_table(results["kv_quality"])
    if "long_context" in results:
        lines += long_context_tables(results["long_context"])
    if "serving" in results:
        lines += serving_tables(results["serving"]) + [f"note: {n}" for n in results["serving"].get("notes", [])]
    return "\n".join(lines)
