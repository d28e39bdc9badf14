"""The engine's counters in Prometheus' text exposition format (version 0.0.4), for GET /metrics."""
from __future__ import annotations

from .engine import EngineMetrics

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
            f"KV cache capacity: the paged pool's blocks of {m.block_size} positions.", m.kv_blocks_total)
    _metric(lines, "kvc_kv_blocks_used", "gauge",
            "KV blocks held by running sequences (a block shared by several counts once).", m.kv_blocks_used)
    _metric(lines, "kvc_kv_blocks_cached", "gauge",
            "KV blocks held by no sequence but keeping a prompt prefix for reuse (taken back, least "
            "recently used first, when the pool needs them).", m.kv_blocks_cached)
    _metric(lines, "kvc_prefix_cache_hit_tokens_total", "counter",
            "Prompt tokens whose K/V were found in the prefix cache (not computed again).",
            m.prefix_cache_hit_tokens)
    _metric(lines, "kvc_prompt_tokens_total", "counter",
            "Prompt tokens of every request (once per request, whatever its n), cached ones included.",
            m.prompt_tokens)
    _metric(lines, "kvc_generation_tokens_total", "counter", "Tokens sampled, all choices.", m.generation_tokens)
    _metric(lines, "kvc_generation_tokens_per_second", "gauge",
            "Tokens sampled per second over the last 10 seconds, all requests together.",
            m.generation_tokens_per_second)
    _metric(lines, "kvc_requests_running", "gauge", "Requests with a sequence in the KV cache.", m.requests_running)
    _metric(lines, "kvc_requests_waiting", "gauge", "Requests waiting to start (or, preempted, to go on).",
            m.requests_waiting)
    _metric(lines, "kvc_requests_finished_total", "counter",
            "Requests that ended, by outcome (ok, cancelled, failed).", 0, m.requests_finished, "outcome")
    _metric(lines, "kvc_requests_rejected_total", "counter",
            "Requests refused with 503 because the queue was full.", m.requests_rejected)
    _metric(lines, "kvc_preemptions_total", "counter",
            "Sequences whose KV blocks were freed for others when the pool ran short (each recomputed later).",
            m.preemptions)
    _metric(lines, "kvc_prefill_seconds_total", "counter",
            "Seconds of batched steps spent on prompt tokens (each step's time shared out by its tokens).",
            m.prefill_seconds)
    _metric(lines, "kvc_decode_seconds_total", "counter",
            "Seconds of batched steps spent on generated tokens.", m.decode_seconds)
    _metric(lines, "kvc_slot_saves_total", "counter",
            "Conversations' caches written to session files (POST /slots/save).", m.slot_saves)
    _metric(lines, "kvc_slot_restores_total", "counter",
            "Session files loaded into the prefix cache (POST /slots/restore).", m.slot_restores)
    _metric(lines, "kvc_parallel", "gauge", "Most sequences running at once (--parallel).", m.parallel)
    return "\n".join(lines) + "\n"
