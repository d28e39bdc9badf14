"""The engine's counters in Prometheus' text exposition format (version 0.0.4), for GET /metrics."""
from __future__ import annotations

from .engine import BLOCK_SIZE, EngineMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _metric(lines: list[str], name: str, kind: str, help_text: str, value: float,
            labels: dict[str, int] | None = None, label: str = "") -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    if labels is None:
        lines.append(f"{name} {value}")
    else:
        for key, count in sorted(labels.items()):
            lines.append(f'{name}{{{label}="{key}"}} {count}')


def render(m: EngineMetrics) -> str:
    """m as Prometheus text."""
    lines: list[str] = []
    _metric(lines, "kvc_kv_blocks_total", "gauge",
            f"KV cache capacity in blocks of {BLOCK_SIZE} positions. Today each worker owns one sequence "
            "with its own cache: this is the sum of the workers' contexts, in blocks.", m.kv_blocks_total)
    _metric(lines, "kvc_kv_blocks_used", "gauge",
            f"KV cache positions holding tokens, in blocks of {BLOCK_SIZE} positions: the sum over the "
            "workers of the positions each worker's cache holds (its last or current conversation, kept "
            "for prefix reuse), each rounded up to whole blocks.", m.kv_blocks_used)
    _metric(lines, "kvc_prefix_cache_hit_tokens_total", "counter",
            "Prompt tokens whose K/V were already in a worker's cache (not computed again), over all choices.",
            m.prefix_cache_hit_tokens)
    _metric(lines, "kvc_prompt_tokens_total", "counter",
            "Prompt tokens of every choice run, cached ones included.", m.prompt_tokens)
    _metric(lines, "kvc_generation_tokens_total", "counter", "Tokens sampled.", m.generation_tokens)
    _metric(lines, "kvc_requests_running", "gauge", "Requests a worker is running.", m.requests_running)
    _metric(lines, "kvc_requests_waiting", "gauge", "Requests queued, waiting for a free worker.",
            m.requests_waiting)
    _metric(lines, "kvc_requests_finished_total", "counter",
            "Requests that ended, by outcome (ok, cancelled, failed).", 0, m.requests_finished, "outcome")
    _metric(lines, "kvc_requests_rejected_total", "counter",
            "Requests refused with 503 because the queue was full.", m.requests_rejected)
    _metric(lines, "kvc_prefill_seconds_total", "counter", "Seconds spent running prompts (all workers).",
            m.prefill_seconds)
    _metric(lines, "kvc_decode_seconds_total", "counter",
            "Seconds spent generating tokens after the prompt (all workers).", m.decode_seconds)
    _metric(lines, "kvc_workers", "gauge", "Workers, each running one request at a time.", m.workers)
    return "\n".join(lines) + "\n"
