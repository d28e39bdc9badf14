"""kvc beside llama.cpp in one run (part "side-by-side" of `make bench`): the same weights, measured
alternately (kvc then llama.cpp in one round, llama.cpp then kvc in the next, ...), several rounds;
each figure's median per engine, its spread, and the ratio of the medians.

The figures are llama-bench's: ppN runs a prompt of N tokens from an empty cache, tgN decodes N
tokens one at a time from an empty cache, both in tokens per second. "tgN busy" is tgN on the most
threads of the plan while a spinning process, started and stopped here, keeps one core busy.

llama.cpp runs as its own llama-bench (`make peer` builds it) with its defaults: an f16 K/V cache,
flash attention auto, one repetition per round after its warm-up run. kvc runs in a fresh child
process per round through kvc.Model, with an f16 K/V cache as well, after a warm-up prefill. Neither
samples: both feed fixed tokens.

The weights are the same: llama.cpp reads the shipped Q4_1 GGUF and the F32 and Q8_0 GGUFs that
llama-quantize makes of it; kvc reads its exports of the shipped GGUF (`make model`, --dtype f32 and
--dtype q8_0), which keep the Q4_1 blocks as they are, dequantize them to the same f32 values, or
requantize those per 32 values to Q8_0 as llama-quantize does.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..model import Model
from .child import run_command
from .files import find_gguf
from .kvc_run import measure_prefill, text_tokens
from .peer import peer_binary, requantized_gguf

ENGINES = ("kvc", "llama.cpp")
CACHE_TYPE = "f16"  # llama-bench's default K/V cache type, given to kvc too
WARMUP_TOKENS = 32  # kvc's warm-up prefill (llama-bench warms up with a run of each test)
SPINNER = "while True: pass"  # the process that keeps one core busy
SPINNER_SETTLE_S = 0.5  # before the first busy run: the spinner is running and the scheduler has placed it
# The llama.cpp GGUF each kvc weight type is compared on: None is the shipped (Q4_1) GGUF itself,
# else the llama-quantize type of the GGUF made from it.
GGUF_FTYPES = {"f32": "F32", "q8_0": "Q8_0", "q4_1": None}


@dataclass
class SideSizes:
    """What the side-by-side part measures, and how many rounds."""

    prefill: list[int] = field(default_factory=lambda: [128, 512])  # ppN
    decode: int = 256  # tgN
    busy_decode: int = 64  # tgN with one core busy (0: not measured); short, as llama.cpp may crawl
    rounds: int = 3


FULL_SIDE = SideSizes()
QUICK_SIDE = SideSizes(prefill=[32], decode=32, busy_decode=16, rounds=1)


def kvc_figures(path: str | os.PathLike, threads: int, prefill: list[int], decode: int) -> dict:
    """kvc's tok/s for ppN (each N in prefill) and tg<decode>, in this process (the child's side), and
    how its threads were used (Model.thread_use())."""
    context = max(prefill + [decode, WARMUP_TOKENS])
    figures = {}
    with Model(path, seq_len=context, threads=threads, cache_type_k=CACHE_TYPE, cache_type_v=CACHE_TYPE) as model:
        tokens = text_tokens(model, context)
        model.prefill(tokens[:WARMUP_TOKENS], 0)  # pages the weights in
        for n in prefill:
            figures[f"pp{n}"] = measure_prefill(model, tokens[:n], repeats=1)["tok_s"]
        if decode:
            model.reset()
            t0 = time.perf_counter()
            for i in range(decode):
                model.prefill(tokens[i:i + 1], i)
            figures[f"tg{decode}"] = decode / (time.perf_counter() - t0)
        use = model.thread_use()
    return {"figures": figures, "thread_use": use}


def parse_llama_bench(text: str) -> dict[str, float]:
    """llama-bench's `-o json` records as {"ppN" or "tgN": tok/s}; ValueError if there are none."""
    figures = {}
    for rec in json.loads(text):
        if rec["n_prompt"] and not rec["n_gen"]:
            figures[f"pp{rec['n_prompt']}"] = float(rec["avg_ts"])
        elif rec["n_gen"] and not rec["n_prompt"]:
            figures[f"tg{rec['n_gen']}"] = float(rec["avg_ts"])
    if not figures:
        raise ValueError("llama-bench printed no pp or tg records")
    return figures


def llama_figures(bench: Path, gguf: Path, threads: int, prefill: list[int], decode: int, timeout: float) -> dict:
    """llama-bench's tok/s for the same tests, one repetition; {"error": ...} if it fails."""
    cmd = [os.fspath(bench), "-m", os.fspath(gguf), "-t", str(threads), "-r", "1", "-o", "json",
           "-p", ",".join(map(str, prefill)) or "0", "-n", str(decode), "-ctk", CACHE_TYPE, "-ctv", CACHE_TYPE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"llama-bench timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"llama-bench exit {proc.returncode}: {' / '.join(proc.stderr.strip().splitlines()[-3:])}"}
    try:
        figures = parse_llama_bench(proc.stdout)
    except (ValueError, KeyError, TypeError) as e:
        return {"error": f"llama-bench output: {e}"}
    build = json.loads(proc.stdout)[0].get("build_commit", "?")
    return {"figures": figures, "build": build}


def kvc_child(path: Path, threads: int, prefill: list[int], decode: int, timeout: float) -> dict:
    """kvc_figures in a fresh child process (`python -m kvc.bench --one-side ...`)."""
    return run_command(["--one-side", os.fspath(path), str(threads), ",".join(map(str, prefill)), str(decode)], timeout)


@contextmanager
def busy_core() -> Iterator[int]:
    """A process spinning on one core for the duration; its pid."""
    proc = subprocess.Popen([sys.executable, "-c", SPINNER])
    try:
        time.sleep(SPINNER_SETTLE_S)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def peer_gguf(dtype: str, src: Path) -> Path | None:
    """The GGUF llama.cpp runs beside kvc's `dtype` export of src (SmolLM2's shipped GGUF): src itself
    for the shipped type, else the one llama-quantize makes of it (the first time); None when llama.cpp
    has no counterpart."""
    if dtype not in GGUF_FTYPES:
        return None
    ftype = GGUF_FTYPES[dtype]
    return src if ftype is None else requantized_gguf(src, ftype)


def contenders(models: dict[str, Path], gguf: Path | None) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """(kvc model, llama.cpp GGUF) per weight type of models that has a GGUF counterpart, and notes
    about those that have none."""
    src = gguf or find_gguf()
    pairs, notes = {}, []
    for dtype, path in models.items():
        peer = peer_gguf(dtype, src)
        if peer is None:
            notes.append(f"{dtype}: no llama.cpp counterpart")
        else:
            pairs[dtype] = (path, peer)
    return pairs, notes


def _record(rows: dict, key: tuple, engine: str, res: dict, errors: list[str], label: str) -> None:
    if "error" in res:
        errors.append(f"{engine} {label}: {res['error']}")
        return
    for test, tok_s in res["figures"].items():
        name = f"{test} busy" if key[2] else test
        rows.setdefault((key[0], key[1], name), {e: [] for e in ENGINES})[engine].append(tok_s)


def run_side_by_side(models: dict[str, Path], threads: list[int], sizes: SideSizes, gguf: Path | None,
                     timeout: float, say: Callable[[str], None]) -> dict:
    """Every figure of every weight type and thread count, kvc and llama.cpp alternately for
    sizes.rounds rounds, then tg<busy_decode> with one core busy; the record results.json keeps."""
    try:
        bench = peer_binary("llama-bench")
        pairs, notes = contenders(models, gguf)
    except (FileNotFoundError, RuntimeError) as e:
        return {"error": f"skipped: {e}"}
    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    rows: dict[tuple, dict[str, list[float]]] = {}
    errors: list[str] = []
    thread_use: list[dict] = []
    builds = set()

    def one(engine: str, dtype: str, t: int, prefill: list[int], decode: int, busy: bool) -> None:
        kvc_model, gguf_path = pairs[dtype]
        label = f"{dtype}, {t} thread(s){', one core busy' if busy else ''}"
        if engine == "kvc":
            res = kvc_child(kvc_model, t, prefill, decode, timeout)
            if "thread_use" in res:
                thread_use.append({"dtype": dtype, "threads": t, "busy": busy, **res["thread_use"]})
        else:
            res = llama_figures(bench, gguf_path, t, prefill, decode, timeout)
            builds.add(res.get("build"))
        _record(rows, (dtype, t, busy), engine, res, errors, label)

    def rounds(thread_counts: list[int], prefill: list[int], decode: int, busy: bool) -> None:
        for r in range(sizes.rounds):
            for dtype in pairs:
                for t in thread_counts:
                    order = ENGINES if r % 2 == 0 else ENGINES[::-1]
                    say(f"side by side, round {r + 1}/{sizes.rounds}: {dtype}, {t} thread(s)"
                        f"{', one core busy' if busy else ''} ({' then '.join(order)})...")
                    for engine in order:
                        one(engine, dtype, t, prefill, decode, busy)

    rounds(threads, sizes.prefill, sizes.decode, busy=False)
    busiest = max(threads)
    if sizes.busy_decode and busiest > 1:
        with busy_core():
            rounds([busiest], [], sizes.busy_decode, busy=True)
    return {
        "llama_bench": os.fspath(bench), "llama_build": ", ".join(sorted(b for b in builds if b)) or "?",
        "models": {d: {"kvc": os.fspath(k), "gguf": os.fspath(g)} for d, (k, g) in pairs.items()},
        "cache_type": CACHE_TYPE, "rounds": sizes.rounds, "threads": threads,
        "sizes": {"prefill": sizes.prefill, "decode": sizes.decode, "busy_decode": sizes.busy_decode},
        "rows": [{"dtype": d, "threads": t, "test": test, **runs} for (d, t, test), runs in rows.items()],
        "thread_use": thread_use, "notes": notes, "errors": errors,
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
    }


def summarize(row: dict) -> dict:
    """A row's median, min and max per engine, and kvc's median over llama.cpp's (None without both)."""
    out = {}
    for e in ENGINES:
        runs = row.get(e, [])
        out[e] = (statistics.median(runs), min(runs), max(runs)) if runs else None
    out["ratio"] = out["kvc"][0] / out["llama.cpp"][0] if out["kvc"] and out["llama.cpp"] else None
    return out
