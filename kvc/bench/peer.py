"""llama.cpp side by side: the tools `make peer` builds, and `python -m kvc.bench.peer kld`, llama.cpp's
own KV cache quality measured the way `python -m kvc.kvquality` measures kvc's.

kld: llama-quantize makes an F32 GGUF of SmolLM2's Q4_1 GGUF (the weights kvc's f32 .bin holds);
`llama-perplexity --kl-divergence-base` saves the log-probabilities of an f32 cache over kvquality's
text and chunks; then `llama-perplexity --kl-divergence` runs once per cache setup of kvquality's
(the f32 cache too) and its PPL, mean / 99th percentile / max KL divergence and "Same top p" (top-1
agreement) become a table like kvquality's.

The same tokens: kvquality tokenizes the text without BOS and replaces each chunk's first token by
BOS. SmolLM2's GGUF says add_bos_token false, so llama-perplexity would keep the text token there.
The runs therefore force add_bos on (--override-kv) and get the text without its first token:
llama.cpp's stream is then BOS + kvc's tokens[1:], which llama-perplexity chunks exactly as
kvquality does. The base file records the tokens llama.cpp evaluated; they are checked against
kvc's chunks (which checks that the two tokenizers agree as well).

Flash attention: the cache setups run with -fa on (a quantized V cache needs it), but -fa on casts an
f32 cache to f16 before attention (src/llama-graph.cpp), so the f32 reference runs with -fa off.

Rotation: this llama.cpp turns quantized K and V by a Hadamard rotation unless LLAMA_ATTN_ROT_DISABLE=1
(its log says attn_rot_k / attn_rot_v); the setups without rotation set it. llama.cpp stores the
reference log-probabilities as 16-bit integers, so its KL divergence has a floor: the f32 row (the
reference cache against its own saved log-probabilities) shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..kvquality import DEFAULT_CTX, REFERENCE, SETUPS, CacheSetup, default_text, format_table, make_chunks
from ..model import Model
from .files import DEFAULT_MODELS, MODELS_DIR, ROOT, find_gguf

PEER_BIN = ROOT / "peer" / "bin"  # where `make peer` puts the binaries
WORK_DIR = MODELS_DIR / "peer-kld"  # the text, the logs and (while it runs) the base log-probabilities
FORCE_BOS = "tokenizer.ggml.add_bos_token=bool:true"
NO_ROTATION_ENV = "LLAMA_ATTN_ROT_DISABLE"
LOG_TAIL_LINES = 20  # of a failed run's log, in the error
LOG_VERBOSITY = 4  # llama.cpp's -lv: 4 (trace) logs the KV cache's attn_rot_k / attn_rot_v lines

# llama-perplexity's summary lines (tools/perplexity/perplexity.cpp); ± is its uncertainty sign
NUMBER = r"([-+0-9.eE]+|nan|inf)"
KLD_PATTERNS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{NUMBER}",
    "mean_kl": rf"Mean\s+KLD:\s*{NUMBER}",
    "mean_kl_se": rf"Mean\s+KLD:\s*\S+\s*±\s*{NUMBER}",
    "p99_kl": rf"99\.0%\s+KLD:\s*{NUMBER}",
    "max_kl": rf"Maximum KLD:\s*{NUMBER}",
    "top1_agreement": rf"Same top p:\s*{NUMBER}",  # in percent
}
ROTATION_PATTERN = r"attn_rot_([kv]) = (\d)"


def peer_binary(name: str) -> Path:
    """The llama.cpp tool `name` (llama-bench, llama-perplexity, llama-server, llama-quantize) that
    `make peer` built; FileNotFoundError telling to run `make peer` when it is not there."""
    path = PEER_BIN / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {PEER_BIN}: run `make peer` (it builds llama.cpp's tools once)")
    return path


def run_tool(cmd: list[str | os.PathLike], log: Path, env: dict[str, str] | None = None) -> str:
    """Run a llama.cpp tool, its stdout and stderr together into log; the text, or RuntimeError with
    the log's last lines when it fails."""
    proc = subprocess.run([os.fspath(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", env=None if env is None else {**os.environ, **env})
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}), log in {log}:\n{tail}")
    return proc.stdout


def requantized_gguf(src: Path, ftype: str) -> Path:
    """A GGUF of src with every matrix in ftype ("F32", "Q8_0"), made once by llama-quantize
    (requantizing the Q4_1 source) as models/smollm2-135m-instruct.<ftype>.gguf."""
    out = MODELS_DIR / f"smollm2-135m-instruct.{ftype.lower()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.tmp")
    try:
        run_tool([peer_binary("llama-quantize"), "--allow-requantize", src, tmp, ftype], WORK_DIR / "quantize.log")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def kvc_text_and_chunks(kvc_model: Path, text: str, ctx: int, n_chunks: int | None) -> tuple[str, list[np.ndarray]]:
    """kvquality's chunks of text (kvc's tokenizer), and the text for llama.cpp: text without the
    characters of its first token, so that BOS + its tokens are kvc's BOS + tokens[1:]."""
    with Model(kvc_model, seq_len=ctx, threads=1) as model:
        tokens = model.encode(text, bos=False)
        first = model.decode(tokens[:1])
        bos = model.config.bos_id
    if not text.startswith(first):
        raise ValueError(f"the text's first token {first!r} is not a prefix of it: cannot drop it")
    return text[len(first):], make_chunks(tokens, ctx, n_chunks, bos)


def base_tokens(path: Path) -> np.ndarray:
    """The tokens llama-perplexity evaluated, from its --kl-divergence-base file ("_logits_", n_ctx,
    n_vocab, n_chunk, then n_ctx * n_chunk int32 tokens), as (n_chunk, n_ctx)."""
    with path.open("rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity log-probabilities file")
        n_ctx, _n_vocab, n_chunk = np.fromfile(f, dtype=np.int32, count=3)
        return np.fromfile(f, dtype=np.int32, count=int(n_ctx) * int(n_chunk)).reshape(n_chunk, n_ctx)


def check_same_chunks(llama_chunks: np.ndarray, kvc_chunks: list[np.ndarray]) -> None:
    """ValueError unless llama.cpp evaluated kvc's chunks. Their first tokens are not compared: the file
    keeps the text's token there and llama-perplexity puts BOS in its place when it evaluates, as kvc does."""
    shape = (len(kvc_chunks), len(kvc_chunks[0]))
    if llama_chunks.shape != shape:
        raise ValueError(f"llama.cpp ran {llama_chunks.shape} chunks x tokens, kvc's are {shape}")
    for i, (ours, theirs) in enumerate(zip(kvc_chunks, llama_chunks)):
        differ = np.flatnonzero(ours[1:] != theirs[1:]) + 1
        if differ.size:
            raise ValueError(f"chunk {i}: llama.cpp's tokens differ from kvc's at {differ.size} positions, "
                             f"first at {differ[0]} ({theirs[differ[0]]} vs {ours[differ[0]]})")


def parse_kld(log: str) -> dict[str, float | bool]:
    """The summary of a `llama-perplexity --kl-divergence` run: PPL, KL statistics, top-1 agreement (a
    fraction) and whether K and V were rotated (rot_k, rot_v)."""
    row: dict[str, float | bool] = {}
    for key, pattern in KLD_PATTERNS.items():
        m = re.search(pattern, log)
        if m is None:
            raise ValueError(f"no {key} in llama-perplexity's output (pattern {pattern!r})")
        row[key] = float(m.group(1)) + 0.0  # + 0.0: a printed -0.000000 becomes 0
    row["top1_agreement"] /= 100
    for axis, on in re.findall(ROTATION_PATTERN, log):
        row[f"rot_{axis}"] = on == "1"
    return row


def flash_attn(setup: CacheSetup) -> str:
    """llama-perplexity's -fa for a setup: on (a quantized V cache needs it), but off for the f32
    reference, which -fa on would cast to f16."""
    return "off" if setup == REFERENCE else "on"


def cache_args(setup: CacheSetup) -> list[str]:
    """llama-perplexity's cache type and flash attention options for a setup."""
    return ["-ctk", setup.k, "-ctv", setup.v, "-fa", flash_attn(setup)]


def cache_rotated(setup: CacheSetup, row: dict) -> bool:
    """Whether llama.cpp rotated the run's cache as the setup asks (its log says so per K and V; it only
    ever rotates quantized types, as kvc's rotation only changes those)."""
    rotated = bool(row.get("rot_k") or row.get("rot_v"))
    if rotated != setup.rotate:
        raise RuntimeError(f"{setup.label}: llama.cpp's log says attn_rot_k={row.get('rot_k')} "
                           f"attn_rot_v={row.get('rot_v')}, the setup asks rotate={setup.rotate}")
    return rotated


def add_ppl_ratios(rows: list[dict]) -> None:
    """Each row's PPL over the first (f32) row's, as kvquality's ppl_ratio. llama.cpp's own PPL(Q)/PPL(base)
    divides by the PPL of the 16-bit saved log-probabilities, a little off the f32 cache's."""
    for row in rows:
        row["ppl_ratio"] = row["ppl"] / rows[0]["ppl"]


def evaluate(gguf: Path, kvc_model: Path, text: str, ctx: int, n_chunks: int | None, threads: int,
             log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """llama.cpp's numbers for REFERENCE and every setup of kvquality's, in kvquality's result shape."""
    perplexity = peer_binary("llama-perplexity")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    model = requantized_gguf(gguf, "F32")
    llama_text, kvc_chunks = kvc_text_and_chunks(kvc_model, text, ctx, n_chunks)
    text_file = WORK_DIR / "text.txt"
    text_file.write_text(llama_text, encoding="utf-8")
    base = WORK_DIR / "base.kld"
    common = [perplexity, "-m", model, "-f", text_file, "-c", str(ctx), "-t", str(threads),
              "--override-kv", FORCE_BOS, "-lv", str(LOG_VERBOSITY)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    try:
        run_tool([*common, "--chunks", str(len(kvc_chunks)), "--kl-divergence-base", base, *cache_args(REFERENCE)],
                 WORK_DIR / "base.log")
        check_same_chunks(base_tokens(base), kvc_chunks)
        log(f"base (f32 cache) done, {time.perf_counter() - started:.0f} s")
        for setup in [REFERENCE, *SETUPS]:
            name = setup.label.replace("/", "-").replace(" ", "-")
            out = run_tool([*common, "--kl-divergence-base", base, "--kl-divergence", *cache_args(setup)],
                           WORK_DIR / f"kld-{name}.log", env=None if setup.rotate else {NO_ROTATION_ENV: "1"})
            row = parse_kld(out)
            rows.append({"k": setup.k, "v": setup.v, "rotate": cache_rotated(setup, row),
                         "flash_attn": flash_attn(setup), **row})
            log(f"{setup.label} done, {time.perf_counter() - started:.0f} s")
    finally:
        base.unlink(missing_ok=True)  # ~100 MB per chunk
    add_ppl_ratios(rows)
    return {"engine": "llama.cpp", "model": str(model), "ctx": ctx, "chunks": len(kvc_chunks),
            "scored_per_chunk": ctx - 1 - ctx // 2, "threads": threads,
            "seconds": round(time.perf_counter() - started, 1), "load_before": load_before,
            "load_after": os.getloadavg(), "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvc.bench.peer", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    kld = sub.add_parser("kld", help="llama.cpp's KV cache quality, as `python -m kvc.kvquality` measures kvc's")
    kld.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF (default: found like `make data` puts it)")
    kld.add_argument("--kvc-model", type=Path, default=DEFAULT_MODELS["f32"][0],
                     help=f"a kvc model, whose tokenizer makes kvquality's chunks (default {DEFAULT_MODELS['f32'][0].name})")
    kld.add_argument("--text", type=Path, help="a UTF-8 text file (default: kvquality's, Python's pydoc topics)")
    kld.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default {DEFAULT_CTX})")
    kld.add_argument("--chunks", type=int, help="how many chunks (default: as many as fit)")
    kld.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (default: every core)")
    kld.add_argument("--json", type=Path, help="write the numbers here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        gguf = args.gguf or find_gguf()
        text = args.text.read_text(encoding="utf-8") if args.text else default_text()
        result = evaluate(gguf, args.kvc_model, text, args.ctx, args.chunks, args.threads)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"kvc.bench.peer: {e}", file=sys.stderr)
        return 1
    print(f"llama.cpp ({result['model']}, {result['threads']} threads, {result['seconds']} s)\n")
    print(format_table(result))
    print("\nThe f32 reference (and its row) ran with -fa off, every other row with -fa on.")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
