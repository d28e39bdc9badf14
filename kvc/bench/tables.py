"""The README's markdown tables from a results dict: throughput, ms/token by position, Q8_0 quality."""
from __future__ import annotations


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


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
    return _table(head, rows)


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
            "(effective GB/s at the last position in the last column):", ""] + _table(head, rows)


def _notes(results: dict) -> list[str]:
    """Q8_0's quality, failed configurations, and what became of llama.cpp."""
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
    if results.get("llama_cpp"):
        lines += ["", f"llama.cpp: {results['llama_cpp']}"]
    return lines


def markdown_tables(results: dict) -> str:
    """The README tables: throughput per configuration, ms/token by position, Q8_0 quality."""
    runs = [r for r in results["runs"] if "error" not in r]
    lines = (_heading(results) + [""] + _throughput(runs, results.get("roofline", {})) + _by_position(runs)
             + _notes(results))
    return "\n".join(lines)
