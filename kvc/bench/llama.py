"""llama.cpp (llama-cpp-python, optional): GGUFs of kvc's precisions, and the same measurements as kvc's."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import time
from pathlib import Path

from .files import MODELS_DIR
from .rss import current_rss_mb, peak_rss_mb
from .timing import best_time, decode_record, throughput, time_by_position
from .workload import FIXED_TEXT, FULL, Sizes, cycle_tokens


def have_llama_cpp() -> bool:
    """Whether llama-cpp-python is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def llama_gguf(src: Path, dtype: str, models_dir: Path = MODELS_DIR) -> Path:
    """A GGUF of `dtype` made from src by llama.cpp's quantizer (requantizing the Q4_1 source)."""
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


def gguf_dtype(gguf: str | os.PathLike) -> str:
    """The precision a GGUF made by llama_gguf holds, from its name (smollm2-135m-instruct.q8_0.gguf)."""
    suffixes = Path(gguf).suffixes
    return suffixes[-2].lstrip(".") if len(suffixes) > 1 else "?"


def run_one_llama(gguf: str | os.PathLike, threads: int, sizes: Sizes = FULL) -> dict:
    """The same measurements with llama.cpp (llama-cpp-python). Decode feeds FIXED_TEXT tokens
    instead of its own argmax (the same work per step; llama-cpp-python's logits API varies)."""
    from llama_cpp import Llama

    rss_start = current_rss_mb()
    t_start = time.perf_counter()
    llm = Llama(model_path=os.fspath(gguf), n_ctx=sizes.seq_len, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    toks = cycle_tokens(llm.tokenize(FIXED_TEXT.encode(), add_bos=True),
                        llm.tokenize(FIXED_TEXT.encode(), add_bos=False), sizes.seq_len)

    best_time(lambda: llm.eval(toks[:min(32, sizes.seq_len)]), 1, before=llm.reset)  # warm-up
    pre = [throughput(n, best_time(lambda: llm.eval(toks[:n]), sizes.repeats, before=llm.reset))
           for n in sizes.prefill]
    llm.reset()
    llm.eval(toks[:sizes.prompt])
    t0 = time.perf_counter()
    for i in range(sizes.decode):
        llm.eval([toks[sizes.prompt + i]])
    decode = decode_record(sizes.decode, sizes.prompt, time.perf_counter() - t0)
    llm.reset()
    by_pos = time_by_position(sizes.positions, sizes.steps, lambda start, end: llm.eval(toks[start:end]),
                              lambda pos, i: llm.eval([toks[pos + i]]))
    return {
        "engine": "llama.cpp", "threads": threads, "model": os.fspath(gguf), "seq_len": sizes.seq_len,
        "prefill": pre, "decode": decode, "by_position": by_pos,
        "peak_rss_mb": peak_rss_mb(), "rss_before_open_mb": rss_start,
        "seconds": time.perf_counter() - t_start,
    }
