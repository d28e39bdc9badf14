"""The PNG: ms/token against position, and tok/s bars, per configuration (needs matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _label(run: dict) -> str:
    return f"{run['engine']} {run.get('dtype', '?')} t{run['threads']}"


def _latency_panel(ax, runs: list[dict]) -> None:
    """ms per decoded token against the cache position, a line per configuration."""
    for r in runs:
        xs = [b["pos"] for b in r["by_position"]]
        ys = [b["ms_per_token"] for b in r["by_position"]]
        ax.plot(xs, ys, marker="o", linestyle="-" if r["engine"] == "kvc" else "--", label=_label(r))
    ax.set_xlabel("position (tokens in the KV cache)")
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title("Decode latency as the context grows")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


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
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot(results: dict, path: Path) -> str | None:
    """ms/token against position, and tok/s bars, as a PNG; returns why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    runs = [r for r in results["runs"] if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    _latency_panel(ax1, runs)
    _throughput_panel(ax2, runs)
    m = results["machine"]
    fig.suptitle(f"kvc, SmolLM2-135M-Instruct — {m['cpu']}, {m['usable_cores']} cores, {m['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
