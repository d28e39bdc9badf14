"""`python -m kvc.bench.serving MODEL`: what the paged KV cache and continuous batching buy a server.

Three measurements, printed as markdown tables:

(a) memory waste: a set of requests of mixed prompt and reply lengths, all running at once on a
    kvc.Pool through the server's Scheduler; at the step where the most tokens are held, the KV
    bytes reserved against the bytes holding tokens, for the paged pool (blocks in use) and for a
    contiguous cache reserving the whole context per sequence (what one Model per request takes).
(b) prefix sharing: N requests whose prompts start with the same long system prompt, run at once
    after the first one's prompt ran: blocks in use at the peak and prompt tokens computed, with
    the prefix cache, and without it (the same lengths, each prompt made distinct by its first token).
(c) throughput: aggregate generated tok/s of 1, 4 and 16 concurrent completions through the HTTP
    server (`python -m kvc.serve` in a subprocess, the openai client), against the same requests
    sent one after another. With --peer LLAMA_SERVER GGUF, llama.cpp's llama-server (`-np N`) runs
    the same requests too, alternating with kvc round by round.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from ..model import Model
from ..sampler import Sampler
from ..serve.scheduler import ScheduledRequest, Scheduler


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


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


# -- (a) memory waste ---------------------------------------------------------------------------------


@dataclass
class Waste:
    sequences: int
    context: int
    tokens_held: int  # positions holding tokens at the peak
    bytes_per_position: float
    paged_reserved: int  # bytes of the blocks in use at the peak
    contiguous_reserved: int  # bytes a whole context per running sequence takes

    @property
    def token_bytes(self) -> float:
        return self.tokens_held * self.bytes_per_position


def memory_waste(model: Model, requests: int = 16, block_size: int = 16, context: int | None = None,
                 seed: int = 0, threads: int | None = None) -> Waste:
    """(a): `requests` requests of random prompt (8..context/2) and reply (8..context/4) lengths,
    all at once; KV bytes reserved vs holding tokens at the step holding the most tokens."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    with model.pool(blocks=1, block_size=block_size) as probe:
        context = probe.max_seq_len if context is None else min(context, probe.max_seq_len)
    lengths = [(rng.randint(8, context // 2), rng.randint(8, max(8, context // 4))) for _ in range(requests)]
    blocks = sum(-(-(p + r) // block_size) for p, r in lengths)  # room for all at once: no preemption
    with model.pool(blocks=blocks, block_size=block_size, threads=threads) as pool:
        sched = Scheduler(pool, parallel=requests, context=context)
        for prompt_len, reply in lengths:
            sched.add(_greedy_request([rng.randrange(3, vocab) for _ in range(prompt_len)], vocab, reply))
        peak = {"tokens": -1, "blocks": 0}

        def look(s: Scheduler) -> None:
            held = sum(c.seq.len for c in s.running)
            if held > peak["tokens"]:
                peak.update(tokens=held, blocks=pool.stats().used, running=len(s.running))

        _run(sched, look)
        per_position = pool.block_bytes / block_size
        return Waste(sequences=peak["running"], context=context, tokens_held=peak["tokens"],
                     bytes_per_position=per_position, paged_reserved=peak["blocks"] * pool.block_bytes,
                     contiguous_reserved=int(peak["running"] * context * per_position))


def waste_table(w: Waste) -> str:
    rows = []
    for name, reserved in (("contiguous (a whole context per sequence)", w.contiguous_reserved),
                           ("paged pool (blocks in use)", w.paged_reserved)):
        rows.append([name, _mib(reserved), _mib(w.token_bytes), _mib(reserved - w.token_bytes),
                     f"{100 * (1 - w.token_bytes / reserved):.1f}"])
    return (f"(a) KV memory, {w.sequences} sequences at once, context {w.context}, {w.tokens_held} positions "
            f"holding tokens at the peak\n\n"
            + _table(["KV cache", "reserved MiB", "holding tokens MiB", "wasted MiB", "wasted %"], rows))


# -- (b) prefix sharing -------------------------------------------------------------------------------


@dataclass
class Sharing:
    requests: int
    prompt_tokens: int  # each request's
    shared_tokens: int
    blocks_peak: dict[bool, int]  # by prefix caching on/off
    computed: dict[bool, int]  # prompt tokens computed (not found in the cache)
    seconds: dict[bool, float]


def prefix_sharing(model: Model, requests: int = 8, system_tokens: int = 512, user_tokens: int = 16,
                   max_tokens: int = 8, block_size: int = 16, threads: int | None = None) -> Sharing:
    """(b): requests sharing a system prompt of system_tokens, each with its own user_tokens, run at
    once after the first one's prompt ran; with the prefix cache, and with each prompt made
    distinct at its first token (nothing to share)."""
    rng = random.Random(1)
    vocab = model.config.vocab_size
    system = [rng.randrange(3, vocab) for _ in range(system_tokens)]
    users = [[rng.randrange(3, vocab) for _ in range(user_tokens)] for _ in range(requests)]
    length = system_tokens + user_tokens
    blocks = requests * -(-(length + max_tokens) // block_size) + 1
    peak: dict[bool, int] = {}
    computed: dict[bool, int] = {}
    seconds: dict[bool, float] = {}
    for sharing in (True, False):
        prompts = [(system if sharing else [3 + i % (vocab - 3)] + system[1:]) + u for i, u in enumerate(users)]
        with model.pool(blocks=blocks, block_size=block_size, threads=threads) as pool:
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
            seconds[sharing] = time.perf_counter() - t0
            peak[sharing] = most[0]
            computed[sharing] = requests * length - sum(r.cached_tokens for r in [first, *rest])
    return Sharing(requests, length, system_tokens, peak, computed, seconds)


def sharing_table(s: Sharing) -> str:
    rows = [[("on" if on else "off (prompts made distinct)"), str(s.blocks_peak[on]), str(s.computed[on]),
             f"{s.seconds[on]:.2f}"] for on in (False, True)]
    return (f"(b) {s.requests} requests of {s.prompt_tokens} prompt tokens sharing a {s.shared_tokens}-token "
            f"system prompt\n\n" + _table(["prefix cache", "blocks in use (peak)", "prompt tokens computed",
                                            "seconds"], rows))


# -- (c) throughput through the server ----------------------------------------------------------------


PROMPTS = ["Once upon a time", "The capital of France is", "Here is a list of fruits:", "My favourite book is",
           "In the year 2050,", "The best way to learn is", "A recipe for pancakes:", "Dear diary, today"]


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


def _complete(url: str, prompt: str, max_tokens: int) -> int:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    r = client.completions.create(model="x", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.usage.completion_tokens


def throughput(url: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    """Aggregate generated tok/s of `concurrency` completions at once, and of the same sent one
    after another."""
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (#{i})" for i in range(concurrency)]
    _complete(url, "Hello", 4)  # warm
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        together = sum(pool.map(lambda p: _complete(url, p, max_tokens), prompts))
    t_together = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = sum(_complete(url, p, max_tokens) for p in prompts)
    t_alone = time.perf_counter() - t0
    return {"concurrent": together / t_together, "sequential": alone / t_alone}


def kvc_server_argv(model: str, parallel: int, threads: int | None, context: int) -> list[str]:
    argv = [sys.executable, "-m", "kvc.serve", model, "--port", "0", "-np", str(parallel), "-c", str(context),
            "--log-level", "warning"]
    return argv + (["-t", str(threads)] if threads else [])


def serving_throughput(model: str, levels: list[int], max_tokens: int, threads: int | None, context: int,
                       rounds: int = 1, peer: tuple[str, str] | None = None) -> list[list[str]]:
    """(c): rows of (server, requests, round, concurrent tok/s, sequential tok/s, speed-up), a server
    started per level and round with -np = the level; with peer (llama-server, gguf) each round runs
    kvc, then llama-server, on the same requests."""
    rows = []
    for level in levels:
        for round_ in range(rounds):
            servers = ["kvc"] + (["llama-server"] if peer is not None else [])
            for name in servers:
                if name == "kvc":
                    p, url = start_server(kvc_server_argv(model, level, threads, context), r"http://[^:]+:(\d+)/v1")
                else:
                    p, url = _start_peer(*peer, level, threads, context)
                try:
                    t = throughput(url, level, max_tokens)
                finally:
                    stop_server(p)
                rows.append([name, str(level), str(round_ + 1), f"{t['concurrent']:.1f}", f"{t['sequential']:.1f}",
                             f"{t['concurrent'] / t['sequential']:.2f}"])
    return rows


def _start_peer(binary: str, gguf: str, parallel: int, threads: int | None, context: int,
                timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """llama-server with -np parallel (a context of `context` per slot), once its /health answers 200."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [binary, "-m", gguf, "--port", str(port), "-np", str(parallel), "-c", str(context * parallel)]
    p = subprocess.Popen(argv + (["-t", str(threads)] if threads else []), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"llama-server exited with {p.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p, f"http://127.0.0.1:{port}/v1"
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(p)
    raise RuntimeError(f"llama-server did not start in {timeout} s")


def throughput_table(rows: list[list[str]], max_tokens: int) -> str:
    return (f"(c) aggregate generated tok/s, completions of up to {max_tokens} tokens (greedy) through the "
            f"server\n\n" + _table(["server", "requests", "round", "concurrent tok/s", "one after another tok/s",
                                    "speed-up"], rows))


# -- the command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kvc.bench.serving", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a kvc checkpoint with a tokenizer")
    ap.add_argument("--requests", type=int, default=16, help="(a) requests of mixed lengths (default 16)")
    ap.add_argument("--context", type=int, default=512, help="positions per sequence (default 512)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--shared", type=int, default=512, help="(b) system prompt tokens (default 512)")
    ap.add_argument("--sharers", type=int, default=8, help="(b) requests sharing it (default 8)")
    ap.add_argument("--levels", default="1,4,16", help="(c) concurrent requests (default 1,4,16)")
    ap.add_argument("--max-tokens", type=int, default=64, help="(c) tokens per completion (default 64)")
    ap.add_argument("--rounds", type=int, default=1, help="(c) rounds per level (default 1)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--peer", nargs=2, metavar=("LLAMA_SERVER", "GGUF"), default=None,
                    help="(c) also llama-server on this GGUF, alternating with kvc")
    ap.add_argument("--parts", default="abc", help="which measurements (default abc)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.model):
        ap.error(f"no model file at {a.model}")
    with Model(a.model, seq_len=16, threads=1) as model:
        if "a" in a.parts:
            print(waste_table(memory_waste(model, a.requests, a.block_size, a.context, threads=a.threads)), "\n")
        if "b" in a.parts:
            print(sharing_table(prefix_sharing(model, a.sharers, a.shared, block_size=a.block_size,
                                               threads=a.threads)), "\n")
    if "c" in a.parts:
        levels = [int(x) for x in a.levels.split(",")]
        rows = serving_throughput(a.model, levels, a.max_tokens, a.threads, a.context, a.rounds,
                                  tuple(a.peer) if a.peer else None)
        print(throughput_table(rows, a.max_tokens))


if __name__ == "__main__":
    main()
