"""The PNGs (need matplotlib): side_by_side.png, kvc over llama.cpp per figure; bench.png, ms/token
against position and tok/s bars per configuration; cache.png, ms/token and RSS against position per
KV cache type, and generating with and without the cache; long_context.png (and kvc.longppl's PNG),
perplexity by position per KV cache policy and ms/token and RSS over a long windowed generation."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _label(run: dict) -> str:
    return f"{run['engine']} {run.get('dtype', '?')} t{run['threads']}"


def _finish(ax, xlabel: str | None, ylabel: str, title: str, legend_size: int = 8, zero_y: bool = True,
            **grid) -> None:
    """A panel's labels, title, grid (grid: matplotlib's grid options) and legend."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if zero_y:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, **grid)
    ax.legend(fontsize=legend_size)


def _latency_panel(ax, runs: list[dict]) -> None:
    """ms per decoded token against the cache position, a line per configuration."""
    for r in runs:
        xs = [b["pos"] for b in r["by_position"]]
        ys = [b["ms_per_token"] for b in r["by_position"]]
        ax.plot(xs, ys, marker="o", linestyle="-" if r["engine"] == "kvc" else "--", label=_label(r))
    _finish(ax, "position (tokens in the KV cache)", "ms per decoded token (median)", "Decode latency as the context grows")


def _throughput_panel(ax, runs: list[dict]) -> None:
    """Prefill and decode tok/s, a bar per configuration in each group."""
    metrics = sorted({p["tokens"] for r in runs for p in r["prefill"]})
    names = [f"prefill {n}" for n in metrics] + ["decode"]
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        pre = {p["tokens"]: p["tok_s"] for p in r["prefill"]}
        vals = [pre.get(n, 0) for n in metrics] + [r["decode"]["tok_s"]]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=_label(r))
    ax.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, names)
    _finish(ax, None, "tokens / s", "Throughput", zero_y=False, axis="y")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, results: dict, title: str, path: Path) -> None:
    """Title the figure with the machine and date, write it to path, close it."""
    m = results["machine"]
    fig.suptitle(f"{title} — {m['cpu']}, {m['usable_cores']} cores, {m['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict, path: Path) -> str | None:
    """ms/token against position, and tok/s bars, as a PNG; returns why not if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed"
    runs = [r for r in results["runs"] if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    _latency_panel(ax1, runs)
    _throughput_panel(ax2, runs)
    _save(plt, fig, results, "kvc, SmolLM2-135M-Instruct", path)
    return None

def _cache_lines(ax, records: list[dict], key: str) -> None:
    """A line per (weights, cache type) record: its by_position rows' `key` against position."""
    for r in records:
        ax.plot([b["pos"] for b in r["by_position"]], [b[key] for b in r["by_position"]], marker="o",
                linestyle="-" if r["dtype"] == "q8_0" else "--", label=f"{r['dtype']} weights, {r['cache']} cache")


def _cache_latency_panel(ax, records: list[dict]) -> None:
    """ms per decoded token against the cache position, a line per (weights, cache type)."""
    _cache_lines(ax, records, "ms_per_token")
    ax.set_xscale("symlog", linthresh=256)
    ax.set_yscale("log")
    _finish(ax, "position (tokens in the KV cache; linear below 256, log above)", "ms per decoded token (median)",
            "Decode latency per KV cache type", legend_size=7, zero_y=False, which="both")


def _rss_panel(ax, records: list[dict]) -> None:
    """The process's RSS after filling the cache to each position, a line per (weights, cache type)."""
    _cache_lines(ax, records, "rss_mb")
    _finish(ax, "position (tokens in the KV cache)", "RSS MB (2**20 bytes)", "Resident memory as the cache fills",
            legend_size=7)


def _no_cache_panels(ax_total, ax_step, nc: dict) -> None:
    """Total time to generate n tokens (log-log, with the fitted slopes) and ms/token against position,
    with and without the cache."""
    ns = [t["tokens"] for t in nc["totals"]]
    for key, name, slope in (("cache", "with cache", nc["exponent_cache"]),
                             ("no_cache", "without cache", nc["exponent_no_cache"])):
        fit = f" (slope {slope:.2f})" if slope is not None else ""
        ax_total.plot(ns, [t[f"{key}_s"] for t in nc["totals"]], marker="o", label=name + fit)
        ax_step.plot(nc["positions"], nc[f"{key}_ms"], label=name)
    ax_total.set_xscale("log")
    ax_total.set_yscale("log")
    _finish(ax_total, "tokens generated", "total seconds",
            f"Generating n tokens ({nc['dtype']} weights, {nc['threads']} threads)", zero_y=False, which="both")
    _finish(ax_step, "position of the new token", "ms for that token", "Per-token cost, with and without the cache")


def plot_cache(results: dict, path: Path) -> str | None:
    """The cache parts as a PNG: ms/token against position per cache type (log axes), RSS against
    position, and generating with and without the cache; returns why not if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed"
    records = [r for r in results.get("cache_types", []) if "error" not in r]
    nc = results.get("no_cache")
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(13, 10))
    if records:
        _cache_latency_panel(ax1, records)
        _rss_panel(ax2, records)
    if nc and "error" not in nc:
        _no_cache_panels(ax3, ax4, nc)
    _save(plt, fig, results, "kvc KV cache, SmolLM2-135M-Instruct", path)
    return None


def plot_side_by_side(results: dict, path: Path) -> str | None:
    """kvc over llama.cpp per (weights, threads, test) as bars (the ratio of the medians, log scale, 1 marked),
    with each engine's median tok/s written on the bar; returns why not if matplotlib is missing."""
    from .side_by_side import summarize

    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed"
    rows = [(r, summarize(r)) for r in results["side_by_side"]["rows"]]
    rows = [(r, s) for r, s in rows if s["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows) + 2), 5))
    xs = np.arange(len(rows))
    ax.bar(xs, [s["ratio"] for _, s in rows], color=["tab:blue" if "busy" not in r["test"] else "tab:orange" for r, _ in rows])
    for x, (_, s) in zip(xs, rows):
        ax.annotate(f"{s['kvc'][0]:.0f}\n{s['llama.cpp'][0]:.0f}", (x, s["ratio"]), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")  # 0.8x and 1.25x lie as far from 1 as they are
    ax.set_xticks(xs, [f"{r['dtype']} t{r['threads']} {r['test']}" for r, _ in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("kvc / llama.cpp (median tok/s; kvc over llama.cpp on each bar)")
    ax.set_title("kvc beside llama.cpp, alternated on the same weights (orange: one core busy)")
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, results, "kvc vs llama.cpp, SmolLM2-135M-Instruct", path)
    return None


def _perplexity_panel(ax, result: dict, window: int) -> None:
    """Perplexity per bucket of positions (log scale) for dense and each policy of one window size, with
    the window and the model's context marked."""
    size = result["bucket"]
    for r in result["rows"]:
        if "error" in r or r["window"] not in (None, window):
            continue
        xs = [start + min(size, r["scored"] - start) / 2 for start in range(0, r["scored"], size)]  # bucket middles
        ax.plot(xs, r["buckets"], linestyle="--" if r["window"] is None else "-", label=r["label"])
    ax.axvline(window, color="grey", linestyle=":", linewidth=1)
    marks = f"dotted: the window, {window}"
    if result["context"] < result["tokens"]:
        ax.axvline(result["context"], color="black", linestyle=":", linewidth=1)
        marks += f"; the model's context, {result['context']}"
    ax.set_yscale("log")
    _finish(ax, f"position ({marks})",
            f"perplexity per {size} positions", f"Window {window}", legend_size=7, zero_y=False, which="both")


def _flat_panels(ax_ms, ax_rss, flat: dict) -> None:
    """ms/token (median of each interval) and RSS against tokens generated with a sliding window."""
    xs = [m["tokens"] for m in flat["marks"]]
    what = f"window {flat['window']}, {flat['threads'] or 'all'} thread(s)"
    for ax, key, ylabel, title in ((ax_ms, "ms_per_token", "ms per decoded token (median of the interval)",
                                    "Decode ms/token"), (ax_rss, "rss_mb", "RSS MB (2**20 bytes)", "Resident memory")):
        ys = [m[key] for m in flat["marks"]]
        ax.plot(xs, ys, marker="o")
        ax.set_ylim(0, 1.15 * max(ys))
        ax.grid(alpha=0.3)
        ax.set_xlabel("tokens generated")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({what})")


def plot_long_context(ppl: dict | None, path: Path, flat: dict | None = None) -> str | None:
    """kvc.longppl's perplexity curves, a panel per window size, and (flat: kvc.bench.window's result) ms/token
    and RSS over a long windowed generation, as a PNG; returns why not if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed"
    ppl = ppl if ppl and "error" not in ppl else None
    flat = flat if flat and "error" not in flat else None
    if not ppl and not flat:
        return "no long-context results"
    windows = sorted({r["window"] for r in ppl["rows"] if r["window"]}) if ppl else []
    rows, cols = bool(windows) + bool(flat), max(len(windows), 2 if flat else 1)
    fig = plt.figure(figsize=(max(5.5 * cols, 11), 4.5 * rows))  # wide enough for the suptitle
    for i, w in enumerate(windows):
        _perplexity_panel(fig.add_subplot(rows, cols, i + 1), ppl, w)
    if flat:
        first = cols * bool(windows)
        _flat_panels(fig.add_subplot(rows, cols, first + 1), fig.add_subplot(rows, cols, first + 2), flat)
    _save(plt, fig, ppl or flat, f"kvc bounded KV caches, {Path((ppl or flat)['model']).name}", path)
    return None
