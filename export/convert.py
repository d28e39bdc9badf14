"""Source detection and the export pipeline shared by the CLI and the tests."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from kvc.format import KEY_MEAN, Q4_BLOCK, WEIGHT_TYPES, quantize_model, write_model

from .chat import detect_template, token_text
from .common import ExportError, SourceModel, positive_int, progress_bar
from .gguf import is_gguf, read_gguf
from .hf import is_hf_folder, read_hf
from .key_mean import measure_key_mean
from .llama2c import read_llama2c
from .meta import is_meta_folder, read_meta
from .tokenizers import read_tokenizer


def source_kind(src: Path) -> str:
    """'hf', 'meta', 'gguf' or 'llama2c' (llama2.c and kvc files); ExportError otherwise."""
    if not src.exists():
        raise ExportError(f"{src} not found")
    if src.is_dir():
        if is_hf_folder(src):
            return "hf"
        if is_meta_folder(src):
            return "meta"
        raise ExportError(f"{src}: folder has neither config.json (Hugging Face) nor params.json (Meta)")
    if is_gguf(src):
        return "gguf"
    return "llama2c"


def load_source(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                seq_len: int | None = None) -> SourceModel:
    """Read any supported source into a SourceModel with its tokenizer and chat template resolved.

    `tokenizer` (a sentencepiece .model, llama2.c tokenizer.bin or HF tokenizer.json) replaces
    the source's own; `seq_len` overrides the context length.
    """
    src = Path(src)
    kind = source_kind(src)
    want_tok = tokenizer is None
    if kind == "hf":
        model = read_hf(src, want_tok)
    elif kind == "meta":
        model = read_meta(src, want_tok)
    elif kind == "gguf":
        model = read_gguf(src, want_tok)
    else:
        model = read_llama2c(src)
    c = model.config
    if tokenizer is not None:
        model.tokenizer = read_tokenizer(tokenizer, c.vocab_size)
    if model.tokenizer is None:
        raise ExportError(f"{src} has no tokenizer: pass --tokenizer (sentencepiece .model, "
                          "llama2.c tokenizer.bin or tokenizer.json)")
    if len(model.tokenizer.pieces) != c.vocab_size:
        raise ExportError(f"tokenizer has {len(model.tokenizer.pieces)} tokens but the model's vocab is {c.vocab_size}")
    for what, i in (("bos", c.bos_id), ("eos", c.eos_id)):
        if not 0 <= i < c.vocab_size:
            raise ExportError(f"{what} id {i} is outside the vocabulary of {c.vocab_size}")
    if model.jinja:
        model.template = detect_template(model.jinja, model.tokenizer, c.eos_id,
                                         token_text(model.tokenizer, c.bos_id), token_text(model.tokenizer, c.eos_id))
    if seq_len is not None:
        c.seq_len = positive_int(seq_len, "--seq-len")
    return model


def _inputs(src: Path, tokenizer: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """The files an export of `src` may read, each with how an error names it."""
    found = [(src, f"the source {src}")]
    if src.is_dir():
        found = [(f, f"one of the source's files ({f})") for f in sorted(src.iterdir()) if f.is_file()]
        found.append((src.parent / "tokenizer.model", f"the source's tokenizer {src.parent / 'tokenizer.model'}"))
    if tokenizer is not None:
        found.append((Path(tokenizer), f"the tokenizer {tokenizer}"))
    return found


def check_output(out: Path, src: Path, tokenizer: str | os.PathLike | None = None) -> None:
    """ExportError unless `out` can be written: a file in an existing folder that is none of the
    files the export reads (compared as files, so symlinks and hard links count)."""
    if out.is_dir():
        raise ExportError(f"output {out} is a folder")
    if not out.parent.is_dir():
        raise ExportError(f"output folder {out.parent} does not exist")
    if not out.exists():
        return
    for f, what in _inputs(src, tokenizer):
        if f.exists() and os.path.samefile(out, f):
            raise ExportError(f"output {out} is {what}")


def _write(out: Path, model: SourceModel) -> None:
    """write_model with its errors as ExportErrors."""
    with progress_bar(len(model.tensors), "writing") as bar:
        try:
            write_model(out, model.config, model.tensors, model.tokenizer, model.template, progress=lambda name: bar.update())
        except ValueError as e:  # write_model's own checks (config, vocab, shapes, values, group size)
            raise ExportError(str(e)) from None
        except OSError as e:
            raise ExportError(f"cannot write {out}: {e.strerror or e}") from None


def export_model(src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                 group_size: int | None = None, tokenizer: str | os.PathLike | None = None,
                 seq_len: int | None = None, key_mean: bool = True) -> SourceModel:
    """Convert `src` to a kvc file at `out` (written atomically) and return what was written.

    `dtype` None keeps each matrix in the type the source stores it in where kvc runs that type
    (f32, q8_0, q4_0, q4_1; see export.gguf for the others); a dtype converts every matrix to it,
    q8_0 in groups of `group_size` (default 32). With `key_mean` the model is written to a temp file
    first and run by the engine (libkvc.so) over calibration text to measure its key_mean
    (export.key_mean), which the final file carries; without, the file has none.
    """
    if dtype is not None and dtype not in WEIGHT_TYPES:
        raise ExportError(f"unknown dtype {dtype!r} (choose from {', '.join(WEIGHT_TYPES)})")
    if group_size is not None and dtype != "q8_0":
        raise ExportError("--group-size is the q8_0 group: it needs --dtype q8_0")
    out = Path(out)
    check_output(out, Path(src), tokenizer)
    model = load_source(src, tokenizer, seq_len)
    if dtype is not None:
        try:
            model.tensors = quantize_model(model.tensors, WEIGHT_TYPES[dtype], group_size or Q4_BLOCK)
        except ValueError as e:  # rows that are not whole groups
            raise ExportError(f"cannot store the weights as {dtype}: {e}") from None
    model.tensors.pop(KEY_MEAN, None)  # a kvc source's own: measured again for these weights, or left out
    if key_mean:
        calibrated = out.with_name(f"{out.name}.{secrets.token_hex(4)}.key_mean.tmp")
        try:
            _write(calibrated, model)
            try:
                model.tensors[KEY_MEAN] = measure_key_mean(calibrated)
            except OSError as e:  # the engine is not built
                raise ExportError(f"measuring key_mean: {e} (or export with --no-key-mean)") from None
        finally:
            calibrated.unlink(missing_ok=True)
    _write(out, model)
    return model
