"""`python -m kvc.bench.serving [MODEL ...]`: what the paged KV cache and continuous batching buy a server.

Three measurements (part "serving" of `make bench`, or `make bench-serve`), as markdown tables and
a results dict (serving.json):

(a) memory: a mix of requests whose prompt + output lengths spread log-uniformly from --min-len to
    --max-len tokens (default 32 requests, 20..2000), all running at once on a kvc.Pool through the
    server's Scheduler. At the step where the most tokens are held: the KV bytes allocated (blocks in
    use) against the bytes holding tokens, paged, and for a contiguous cache that reserves a whole
    context per running request (what one kvc.Model per request takes): --reserve positions (default
    2048), and the model's whole context.
(b) prefix sharing: --sharers requests (default 16) whose prompts start with one --shared-token system
    prompt (default 500) and end with different questions, run at once after the first one's prompt
    ran: KV blocks and bytes in use at the peak and prompt tokens computed, with the prefix cache, and
    without it (the same lengths, each prompt made distinct at its first token).
(c) throughput: aggregate generated tok/s of 1, 2, 4, 8 and 16 concurrent streamed completions through
    the HTTP server (`python -m kvc.serve` in a subprocess, -np = the streams, the openai client),
    with each stream's time to first token, per model (Q8_0 and f32 by default). With llama.cpp's
    llama-server and the model's GGUF, llama-server (-np = the streams) runs the same requests,
    alternating with kvc (kvc then llama-server in odd rounds, the other way in even ones); medians
    over rounds, the ratio of the medians.

How (c) is made fair: both servers get the same threads (kvc -t T; llama-server -t T -tb T), an f16
K/V cache, the same context per sequence (llama-server splits -c over its -np slots, so it gets
-c = np * context), continuous batching (llama-server's default, given explicitly), a warm-up of a
concurrent batch of short requests on the same client (its connections are kept and reused), the
same prompts on /v1/completions with the same max_tokens, temperature 0 and "ignore_eos": true (both
take it), and tokens counted from each stream's usage, not assumed: the table shows the tokens per
request each engine really generated. Each stream's prompt starts differently, and each server is
started fresh per level and round, so no prompt is found in a cache.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model import Model
from ..sampler import Sampler
from ..serve.scheduler import ScheduledRequest, Scheduler
from . import markdown
from .workload import overridden, positive_int, positive_ints

ENGINES = ("kvc", "llama-server")
CACHE_TYPE = "f16"  # llama-server's default K/V cache type, given to both
KVC_URL = r"http://[^:]+:(\d+)/v1"  # the line kvc.serve logs once it listens


@dataclass
class ServingSizes:
    """What the serving part measures."""

    levels: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # (c) concurrent streams
    max_tokens: int = 256  # (c) tokens per completion
    rounds: int = 3  # (c) rounds per level and engine
    context: int = 512  # (c) positions per sequence
    requests: int = 32  # (a) requests in the mix
    min_len: int = 20  # (a) prompt + output tokens, the shortest
    max_len: int = 2000  # (a) and the longest
    reserve: int = 2048  # (a) a contiguous reservation per request
    sharers: int = 16  # (b) requests sharing the system prompt
    shared: int = 500  # (b) its tokens
    question: int = 16  # (b) each request's own tokens
    answer: int = 64  # (b) and its reply (long enough for all to be running at once at the peak)
    block_size: int = 16


FULL_SERVING = ServingSizes()
QUICK_SERVING = ServingSizes(levels=[1, 2, 4], max_tokens=32, rounds=1, requests=8, max_len=400, sharers=4,
                             shared=100, answer=16)



def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def _run(sched: Scheduler, on_step=None) -> None:
    """Step until the scheduler has nothing left; on_step(sched) after each step."""
    while sched.has_work:
        sched.step()
        if on_step is not None:
            on_step(sched)


def _greedy_request(prompt: list[int], vocab: int, max_tokens: int) -> ScheduledRequest:
    """A request that runs exactly max_tokens tokens (no stop token)."""
    return ScheduledRequest(prompt=prompt, samplers=[Sampler(vocab, temperature=0)], max_tokens=max_tokens)


# -- (a) memory ---------------------------------------------------------------------------------------


def mix_lengths(requests: int, low: int, high: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths whose sums spread log-uniformly over low..high (many short requests,
    a few long ones, as traffic goes); the output a tenth to a half of each."""
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        total = max(2, round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        reply = max(1, min(total - 1, round(total * rng.uniform(0.1, 0.5))))
        out.append((total - reply, reply))
    return out


def memory_waste(model: Model, lengths: list[tuple[int, int]], reserve: int, block_size: int = 16,
                 threads: int | None = None, cache_type: str = CACHE_TYPE, seed: int = 0) -> dict:
    """(a): the requests of `lengths` all at once; KV bytes allocated vs holding tokens at the step
    holding the most tokens, paged and for contiguous reservations of `reserve` positions and of the
    model's whole context per running request."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    blocks = sum(-(-(p + r) // block_size) for p, r in lengths) + len(lengths)  # all at once: no preemption
    with model.pool(blocks=blocks, block_size=block_size, threads=threads, cache_type_k=cache_type,
                    cache_type_v=cache_type) as pool:
        context = pool.max_seq_len
        if max(p + r for p, r in lengths) > context:
            raise ValueError(f"a request of the mix is longer than the model's context ({context})")
        sched = Scheduler(pool, parallel=len(lengths), context=context)
        for prompt_len, reply in lengths:
            sched.add(_greedy_request([rng.randrange(3, vocab) for _ in range(prompt_len)], vocab, reply))
        peak = {"tokens": -1}

        def look(s: Scheduler) -> None:
            held = sum(c.seq.len for c in s.running)
            if held > peak["tokens"]:
                peak.update(tokens=held, blocks=pool.stats().used, running=len(s.running))

        t0 = time.perf_counter()
        _run(sched, look)
        per_position = pool.block_bytes / block_size
        block_bytes = pool.block_bytes
    token_bytes = peak["tokens"] * per_position
    rows = {"paged": peak["blocks"] * block_bytes,
            f"contiguous, {reserve} per request": peak["running"] * reserve * per_position,
            f"contiguous, the model's context ({context}) per request": peak["running"] * context * per_position}
    return {"requests": len(lengths), "lengths": lengths, "min_len": min(p + r for p, r in lengths),
            "max_len": max(p + r for p, r in lengths), "running_at_peak": peak["running"],
            "tokens_held": peak["tokens"], "block_size": block_size, "cache_type": cache_type,
            "bytes_per_position": per_position, "token_bytes": token_bytes, "reserve": reserve, "context": context,
            "seconds": round(time.perf_counter() - t0, 2),
            "rows": [{"cache": name, "allocated": int(b), "waste_pct": 100 * (1 - token_bytes / b)}
                     for name, b in rows.items()]}


def waste_table(w: dict) -> list[str]:
    rows = [[r["cache"], _mib(r["allocated"]), _mib(w["token_bytes"]), _mib(r["allocated"] - w["token_bytes"]),
             f"{r['waste_pct']:.1f}"] for r in w["rows"]]
    return [f"(a) KV memory: {w['requests']} requests of {w['min_len']}..{w['max_len']} prompt + output tokens "
            f"(log-uniform), all at once; at the step holding the most tokens, {w['running_at_peak']} running "
            f"and {w['tokens_held']} positions holding tokens ({w['cache_type']} cache, blocks of "
            f"{w['block_size']}). Goal: paged under 4% wasted, against 60-80% contiguous.", ""] + markdown.table(
        ["KV cache", "allocated MiB", "holding tokens MiB", "wasted MiB", "wasted %"], rows)


# -- (b) prefix sharing -------------------------------------------------------------------------------


def prefix_sharing(model: Model, requests: int = 16, system_tokens: int = 500, user_tokens: int = 16,
                   max_tokens: int = 64, block_size: int = 16, threads: int | None = None,
                   cache_type: str = CACHE_TYPE) -> dict:
    """(b): requests sharing a system prompt of system_tokens, each with its own user_tokens, run at
    once after the first one's prompt ran; with the prefix cache, and with each prompt made
    distinct at its first token (nothing to share)."""
    rng = random.Random(1)
    vocab = model.config.vocab_size
    system = [rng.randrange(3, vocab) for _ in range(system_tokens)]
    users = [[rng.randrange(3, vocab) for _ in range(user_tokens)] for _ in range(requests)]
    length = system_tokens + user_tokens
    blocks = requests * -(-(length + max_tokens) // block_size) + 1
    rows = []
    for sharing in (False, True):
        prompts = [(system if sharing else [3 + i % (vocab - 3)] + system[1:]) + u for i, u in enumerate(users)]
        with model.pool(blocks=blocks, block_size=block_size, threads=threads, cache_type_k=cache_type,
                        cache_type_v=cache_type) as pool:
            sched = Scheduler(pool, parallel=requests, context=length + max_tokens)
            most = [0]
            t0 = time.perf_counter()
            first = _greedy_request(prompts[0], vocab, max_tokens)
            sched.add(first)
            while first.choices[0].generated == 0:  # the first prompt runs alone (its blocks get cached)
                sched.step()
            rest = [_greedy_request(p, vocab, max_tokens) for p in prompts[1:]]
            for r in rest:
                sched.add(r)
            _run(sched, lambda s: most.__setitem__(0, max(most[0], pool.stats().used)))
            rows.append({"prefix_cache": sharing, "blocks_peak": most[0], "bytes_peak": most[0] * pool.block_bytes,
                         "computed": requests * length - sum(r.cached_tokens for r in [first, *rest]),
                         "seconds": round(time.perf_counter() - t0, 2)})
    return {"requests": requests, "prompt_tokens": length, "shared_tokens": system_tokens, "max_tokens": max_tokens,
            "block_size": block_size,
            "cache_type": cache_type, "rows": rows}


def sharing_table(s: dict) -> list[str]:
    rows = [["on" if r["prefix_cache"] else "off (prompts made distinct)", str(r["blocks_peak"]),
             _mib(r["bytes_peak"]), str(r["computed"]), f"{r['seconds']:.2f}"] for r in s["rows"]]
    return [f"(b) {s['requests']} requests of {s['prompt_tokens']} prompt tokens sharing a {s['shared_tokens']}-token "
            f"system prompt, {s['max_tokens']} tokens of reply each ({s['cache_type']} cache, blocks of {s['block_size']})", ""] + markdown.table(
        ["prefix cache", "KV blocks in use (peak)", "KV MiB (peak)", "prompt tokens computed", "seconds"], rows)


# -- (c) throughput through the servers ---------------------------------------------------------------


PROMPTS = ["Once upon a time", "The capital of France is", "Here is a list of fruits:", "My favourite book is",
           "In the year 2050,", "The best way to learn is", "A recipe for pancakes:", "Dear diary, today"]


def _prompt(i: int) -> str:
    """Stream i's prompt: its own first words, so no two streams share a cached prefix."""
    return f"Story {i + 1}. {PROMPTS[i % len(PROMPTS)]}"


def start_server(argv: list[str], ready: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A server subprocess; its base URL once a stderr line matches `ready` (a regex with a port group)."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {p.returncode}")
        match = re.search(ready, line)
        if match:
            return p, f"http://127.0.0.1:{match.group(1)}/v1"
    p.kill()
    raise RuntimeError(f"{argv[0]} did not start in {timeout} s")


def stop_server(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if p.stderr is not None:
        p.stderr.close()


def kvc_server_argv(model: str, parallel: int, threads: int | None, context: int) -> list[str]:
    argv = [sys.executable, "-m", "kvc.serve", model, "--port", "0", "-np", str(parallel), "-c", str(context),
            "-ctk", CACHE_TYPE, "-ctv", CACHE_TYPE, "--log-level", "warning"]
    return argv + (["-t", str(threads)] if threads else [])


def llama_server_argv(binary: str, gguf: str, port: int, parallel: int, threads: int | None,
                      context: int) -> list[str]:
    """llama-server with -np slots of `context` positions each (its -c is split over the slots)."""
    argv = [binary, "-m", gguf, "--port", str(port), "-np", str(parallel), "-c", str(context * parallel),
            "--cont-batching", "-ctk", CACHE_TYPE, "-ctv", CACHE_TYPE]
    return argv + (["-t", str(threads), "-tb", str(threads)] if threads else [])


def start_llama_server(binary: str, gguf: str, parallel: int, threads: int | None, context: int,
                       timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """llama-server once its /health answers 200; its log goes to a temporary file (its tail is in
    the error if it fails to start)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(llama_server_argv(binary, gguf, port, parallel, threads, context),
                         stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    log.close()
                    return p, f"http://127.0.0.1:{port}/v1"
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(p)
    log.seek(0)
    tail = " / ".join(log.read().strip().splitlines()[-3:])
    log.close()
    raise RuntimeError(f"llama-server did not start (exit {p.returncode}): {tail}")


def _stream(client, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: seconds to its first text and to its end, and the completion tokens
    its usage counts."""
    t0 = time.perf_counter()
    first, tokens = None, None
    for chunk in client.completions.create(model="x", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return {"ttft": first, "end": time.perf_counter(), "tokens": tokens}


def throughput(url: str, streams: int, max_tokens: int) -> dict:
    """`streams` streamed completions at once on one client (its connections warmed and reused):
    aggregate generated tok/s over the wall time, each stream's time to first token and tokens."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda i: _stream(client, f"Warm-up {i}: hello", 4), range(streams)))  # warm
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        done = list(pool.map(lambda i: _stream(client, _prompt(i), max_tokens), range(streams)))
    client.close()
    seconds = max(d["end"] for d in done) - t0
    tokens = [d["tokens"] for d in done]
    return {"tok_s": sum(tokens) / seconds, "seconds": seconds, "tokens": tokens,
            "ttft_s": [d["ttft"] for d in done if d["ttft"] is not None], "load": round(load, 2)}


def serving_throughput(models: dict[str, str], sizes: ServingSizes, threads: int | None,
                       peers: dict[str, str] | None = None, llama_server: str | None = None,
                       say=lambda line: None, settle=lambda: None) -> dict:
    """(c): a record per (model, level, round, engine), kvc.serve and (for a model with a GGUF in
    peers, given llama_server) llama-server alternately, a fresh server each with -np = the level;
    settle() before each (e.g. waiting for a quiet CPU)."""
    peers = peers if llama_server else {}
    runs, errors = [], []
    for name, path in models.items():
        for round_ in range(sizes.rounds):
            for level in sizes.levels:
                order = [e for e in ENGINES if e == "kvc" or name in peers]
                for engine in order if round_ % 2 == 0 else order[::-1]:
                    settle()
                    say(f"serving {name}, round {round_ + 1}/{sizes.rounds}: {engine}, {level} stream(s)...")
                    try:
                        if engine == "kvc":
                            p, url = start_server(kvc_server_argv(path, level, threads, sizes.context), KVC_URL)
                        else:
                            p, url = start_llama_server(llama_server, peers[name], level, threads, sizes.context)
                    except RuntimeError as e:
                        errors.append(f"{engine} {name} {level} stream(s): {e}")
                        continue
                    try:
                        t = throughput(url, level, sizes.max_tokens)
                    except Exception as e:  # a failed run is reported with the rest
                        errors.append(f"{engine} {name} {level} stream(s): {type(e).__name__}: {e}")
                        continue
                    finally:
                        stop_server(p)
                    runs.append({"model": name, "engine": engine, "streams": level, "round": round_ + 1, **t})
    return {"models": models, "ggufs": peers, "llama_server": llama_server, "threads": threads,
            "cache_type": CACHE_TYPE, "sizes": {"levels": sizes.levels, "max_tokens": sizes.max_tokens,
                                                "rounds": sizes.rounds, "context": sizes.context},
            "runs": runs, "errors": errors}


def summarize(tp: dict) -> dict[str, list[dict]]:
    """Per model, a row per level: each engine's median tok/s, median time to first token (over every
    stream of every round), speed-up over its own one-stream median, tokens per request; and kvc's
    median over llama-server's."""
    out = {}
    for name in tp["models"]:
        rows = []
        for level in tp["sizes"]["levels"]:
            row: dict = {"streams": level}
            for engine in ENGINES:
                runs = [r for r in tp["runs"] if r["model"] == name and r["engine"] == engine]
                here = [r for r in runs if r["streams"] == level]
                if not here:
                    row[engine] = None
                    continue
                one = [r["tok_s"] for r in runs if r["streams"] == 1]
                tok_s = statistics.median(r["tok_s"] for r in here)
                ttft = [x for r in here for x in r["ttft_s"]]
                tokens = [x for r in here for x in r["tokens"]]
                row[engine] = {"tok_s": tok_s, "runs": [r["tok_s"] for r in here],
                               "ttft_ms": 1000 * statistics.median(ttft) if ttft else None,
                               "speedup": tok_s / statistics.median(one) if one else None,
                               "tokens": (min(tokens), max(tokens))}
            both = row["kvc"] and row["llama-server"]
            row["ratio"] = row["kvc"]["tok_s"] / row["llama-server"]["tok_s"] if both else None
            rows.append(row)
        out[name] = rows
    return out


def _fmt(x: float | None, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def _tokens(cell: dict | None) -> str:
    if cell is None:
        return "-"
    lo, hi = cell["tokens"]
    return str(lo) if lo == hi else f"{lo}..{hi}"


def throughput_tables(tp: dict) -> list[str]:
    s = tp["sizes"]
    lines = [f"(c) aggregate generated tok/s of concurrent streamed completions of {s['max_tokens']} tokens "
             f"(greedy, ignore_eos) through the HTTP server, -np = streams, {tp['threads'] or 'default'} thread(s), "
             f"{tp['cache_type']} K/V cache, {s['context']} positions per sequence; medians of {s['rounds']} "
             f"round(s), engines alternating; TTFT: the median stream's time to first token; tokens: "
             f"completion tokens per request, from the responses' usage"]
    head = ["streams", "kvc tok/s", "kvc TTFT ms", "kvc vs 1 stream", "kvc tokens", "llama-server tok/s",
            "llama-server TTFT ms", "llama-server vs 1 stream", "llama-server tokens", "kvc / llama-server"]
    for name, rows in summarize(tp).items():
        body = []
        for r in rows:
            cells = [str(r["streams"])]
            for engine in ENGINES:
                c = r[engine]
                cells += ([_fmt(c["tok_s"]), _fmt(c["ttft_ms"], ",.0f"), _fmt(c["speedup"], ".2f"), _tokens(c)]
                          if c else ["-"] * 4)
            body.append(cells + [_fmt(r["ratio"], ".2f")])
        lines += ["", f"{name} ({tp['models'][name]}" + (f"; llama-server on {tp['ggufs'][name]}"
                                                       if name in tp["ggufs"] else "; no llama-server") + ")", ""]
        lines += markdown.table(head, body) + _goals(rows)
    lines += [f"error: {e}" for e in tp["errors"]]
    return lines


def _goals(rows: list[dict]) -> list[str]:
    """The issue's goals at 8 streams (or the most measured): kvc >= 4x one stream, ahead of llama-server."""
    kvc = [r for r in rows if r["kvc"]]
    if not kvc:
        return []
    at = next((r for r in kvc if r["streams"] == 8), kvc[-1])
    said = f"\nAt {at['streams']} streams kvc gives {_fmt(at['kvc']['speedup'], '.2f')}x its one-stream tok/s (goal >= 4x"
    if at["streams"] != 8:
        said += " at 8 streams, not measured here"
    said += ")"
    if at["ratio"] is not None:
        said += f" and {at['ratio']:.2f}x llama-server's (goal > 1)"
    return [said + "."]


# -- everything, and the command line -----------------------------------------------------------------


def run_serving(models: dict[str, str], sizes: ServingSizes, threads: int | None = None,
                peers: dict[str, str] | None = None, llama_server: str | None = None,
                parts: str = "abc", say=lambda line: None, settle=lambda: None) -> dict:
    """Every measurement: (a) and (b) on the first model in-process, (c) on each model through the
    servers; the record results.json keeps under "serving"."""
    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    out: dict = {"sizes": asdict(sizes), "threads": threads}
    first = next(iter(models.values()))
    if "a" in parts or "b" in parts:
        with Model(first, seq_len=16, threads=1) as model:
            if "a" in parts:
                say(f"serving (a): KV memory of {sizes.requests} requests at once...")
                out["memory"] = memory_waste(model, mix_lengths(sizes.requests, sizes.min_len, sizes.max_len),
                                             sizes.reserve, sizes.block_size, threads)
            if "b" in parts:
                say(f"serving (b): {sizes.sharers} requests sharing a {sizes.shared}-token prompt...")
                out["sharing"] = prefix_sharing(model, sizes.sharers, sizes.shared, sizes.question, sizes.answer,
                                                sizes.block_size, threads)
    if "c" in parts:
        out["throughput"] = serving_throughput(models, sizes, threads, peers, llama_server, say, settle)
    out.update(load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()],
               seconds=round(time.perf_counter() - started, 1))
    return out


def serving_tables(res: dict) -> list[str]:
    lines = ["", f"Serving (load average before {res['load_before']}, after {res['load_after']}; "
                 f"{res['seconds']:.0f} s):"]
    if "memory" in res:
        lines += [""] + waste_table(res["memory"])
    if "sharing" in res:
        lines += [""] + sharing_table(res["sharing"])
    if "throughput" in res:
        lines += [""] + throughput_tables(res["throughput"])
    return lines


def _label(path: str) -> str:
    """A model's name in the tables: its weight type (smollm2-135m-instruct.q8_0.bin: q8_0), else its stem."""
    stem = Path(path).stem
    return stem.rsplit(".", 1)[-1] if "." in stem else stem


def _gguf_for(path: str) -> str | None:
    """The GGUF llama-server runs for a kvc model: beside it with .gguf, else (a known weight type) the
    one llama-quantize makes as side-by-side does; None if there is none."""
    beside = Path(path).with_suffix(".gguf")
    if beside.is_file():
        return str(beside)
    from .files import find_gguf
    from .side_by_side import peer_gguf

    try:
        peer = peer_gguf(_label(path), find_gguf())
    except (FileNotFoundError, RuntimeError):
        return None
    return None if peer is None else str(peer)


def parser() -> argparse.ArgumentParser:
    """The serving bench's options (`python -m kvc.bench.serving --help`)."""
    from .files import BENCH_DIR, DEFAULT_MODELS
    from .peer import PEER_BIN

    defaults = [str(DEFAULT_MODELS[d][0]) for d in ("q8_0", "f32")]
    ap = argparse.ArgumentParser(prog="python -m kvc.bench.serving", description=__doc__.split("\n\n")[0],
                                 epilog="(a), (b), (c) as in the module's docstring; --quick: smaller sizes.")
    ap.add_argument("models", nargs="*", default=defaults, help="kvc checkpoints (default: the q8_0 and f32 exports)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check")
    ap.add_argument("--gguf", action="append", default=None,
                    help="(c) the GGUF of each model in order (default: MODEL with .gguf, else llama-quantize's)")
    ap.add_argument("--llama-server", default=str(PEER_BIN / "llama-server"),
                    help="(c) llama.cpp's llama-server (default: `make peer`'s)")
    ap.add_argument("--no-peer", action="store_true", help="(c) kvc only")
    ap.add_argument("--levels", type=positive_ints, help="(c) concurrent streams, e.g. 1,2,4,8,16")
    ap.add_argument("--max-tokens", type=positive_int, help="(c) tokens per completion")
    ap.add_argument("--rounds", type=positive_int, help="(c) rounds per level")
    ap.add_argument("--context", type=positive_int, help="(c) positions per sequence")
    ap.add_argument("--requests", type=positive_int, help="(a) requests in the mix")
    ap.add_argument("--min-len", type=positive_int, help="(a) the shortest prompt + output")
    ap.add_argument("--max-len", type=positive_int, help="(a) the longest prompt + output")
    ap.add_argument("--reserve", type=positive_int, help="(a) contiguous positions reserved per request")
    ap.add_argument("--sharers", type=positive_int, help="(b) requests sharing the system prompt")
    ap.add_argument("--shared", type=positive_int, help="(b) system prompt tokens")
    ap.add_argument("--block-size", type=positive_int)
    ap.add_argument("-t", "--threads", type=positive_int, default=len(os.sched_getaffinity(0)),
                    help="threads of both servers and the pool (default: the usable cores)")
    ap.add_argument("--parts", default="abc", help="which measurements (default abc)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="(c) before each server run wait up to S seconds for the CPU to be under 10%% busy")
    ap.add_argument("--out", default=str(BENCH_DIR / "serving"), help="folder for serving.json and serving.md")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the serving bench; 1 if a server run failed."""
    ap = parser()
    a = ap.parse_args(argv)
    for m in a.models:
        if not os.path.isfile(m):
            ap.error(f"no model file at {m}")
    sizes = serving_sizes(a)
    models = {_label(m): m for m in a.models}
    peers, server = {}, None
    if "c" in a.parts and not a.no_peer:
        if os.path.isfile(a.llama_server):
            server = a.llama_server
            ggufs = a.gguf or [_gguf_for(m) for m in a.models]
            peers = {name: g for name, g in zip(models, ggufs) if g}
        else:
            print(f"no llama-server at {a.llama_server} (`make peer`): kvc only", file=sys.stderr)
    from .machine import wait_for_quiet

    res = run_serving(models, sizes, a.threads, peers, server, a.parts,
                      lambda line: print(line, file=sys.stderr, flush=True),
                      lambda: a.wait_idle and wait_for_quiet(a.wait_idle))
    text = "\n".join(serving_tables(res))
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "serving.md").write_text(text + "\n")
    print(f"\nwrote {out / 'serving.json'}, {out / 'serving.md'}", file=sys.stderr)
    return 1 if res.get("throughput", {}).get("errors") else 0


def serving_sizes(a: argparse.Namespace) -> ServingSizes:
    """QUICK_SERVING or FULL_SERVING, with the options that were given in place of its fields."""
    return overridden(QUICK_SERVING if a.quick else FULL_SERVING, levels=a.levels, max_tokens=a.max_tokens,
                      rounds=a.rounds, context=a.context, requests=a.requests, min_len=a.min_len, max_len=a.max_len,
                      reserve=a.reserve, sharers=a.sharers, shared=a.shared, block_size=a.block_size)


if __name__ == "__main__":
    sys.exit(main())
