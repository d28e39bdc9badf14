"""Writes the fuzz targets' seed corpora and the small real models the encode, decode and chat
targets load: `python fuzz/seeds.py [OUT]` (default fuzz/build; `make fuzz` runs it).

OUT/models/  sp.bin, sp_ws.bin: a sentencepiece BPE tokenizer trained here (byte fallback, a
             user-defined piece), without and with remove_extra_whitespaces, Llama 2 template;
             gpt2.bin, smollm.bin, llama3.bin: a byte-level BPE tokenizer trained here with Hugging
             Face `tokenizers` (ChatML and Llama 3 special tokens, one non-special added token) under
             each pre-tokenizer, with ChatML, ChatML + default system prompt and Llama 3 templates.
             Their order is fuzz/fuzz.h's FUZZ_MODEL_NAMES.
OUT/seeds/<target>/  one file per seed, laid out as fuzz/fuzz_<target>.c reads its input.

Everything is generated from fixed seeds, so the same checkout writes the same files.
"""
from __future__ import annotations

import random
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

from helpers import byte_tokenizer, random_tensors, write_llama2c, write_tokenizer_bin  # noqa: E402
from kvc import format as fmt  # noqa: E402

# the loader's seeds: small enough that libFuzzer's mutations reach every field quickly
TINY = dict(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, seq_len=8)
MODEL_DIMS = dict(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=32)

CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIALS = ["<|endoftext|>"] + CHATML + LLAMA3

TEXTS = [
    "Hello world", "Hello, world!", "hello   world", "  leading spaces", "trailing spaces   ", " ", "   ", "a",
    "tabs\tand\ttabs", "new\nlines\n\nand more\n", "\r\n windows\r\n", "1234567890", "3.14159 and 2,718",
    "I'm sure you'll see they've WE'RE it's", "def f(x):\n    return x ** 2  # square\n",
    "<s>[INST] hi [/INST] there </s>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<tool> call <tool>",
    "Café crème brûlée", "Ελληνικά γράμματα", "日本語のテキスト", "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "٣٤ digits ١٢",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "x\u2581y \u2581\u2581 z", "control \x01\x02 chars",
]
BAD_UTF8 = [b"\xff\xfe bad", b"truncated \xe2\x96", b"\xc0\xaf overlong", b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80"]


def training_lines(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog kvc cache token model attention layer hello world I'm "
             "you'll they've 2024 3.14 42 x=1; f(x) { return } Ελληνικά 日本 über naïve 😀 \t tab").split(" ")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(3000)]


def train_sentencepiece(tmp: Path) -> fmt.Tokenizer:
    import sentencepiece as spm

    from export.tokenizers import read_sentencepiece

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines(0)), model_prefix=str(tmp / "sp"), model_type="bpe", vocab_size=420,
        byte_fallback=True, normalization_rule_name="identity", user_defined_symbols=["<tool>"], minloglevel=2,
    )
    return read_sentencepiece(tmp / "sp.model")


def train_byte_bpe(tmp: Path) -> fmt.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from export.tokenizers import read_hf_tokenizer_json

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=520, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(training_lines(1), trainer)
    tok.add_tokens(["<tool>"])  # an added token that is not special: user-defined
    tok.save(str(tmp / "bpe.json"))
    return read_hf_tokenizer_json(tmp / "bpe.json", add_bos=False)


def variant(t: fmt.Tokenizer, **changes) -> fmt.Tokenizer:
    out = fmt.Tokenizer(list(t.pieces), list(t.scores), list(t.types), t.kind, t.flags, t.pretokenizer, t.unk_id,
                        list(t.merges))
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def write(path: Path, tok: fmt.Tokenizer, template: fmt.ChatTemplate, bos: int, eos: int, seed: int) -> None:
    cfg = fmt.Config(**MODEL_DIMS, vocab_size=len(tok.pieces), bos_id=bos, eos_id=eos)
    fmt.write_model(path, cfg, random_tensors(cfg, seed), tok, template)


def write_models(out: Path) -> dict[str, fmt.Tokenizer]:
    """The five models of FUZZ_MODEL_NAMES; returns their tokenizers by file name."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_sentencepiece(Path(tmp))
        bpe = train_byte_bpe(Path(tmp))
    sp_plain = variant(sp, flags=sp.flags & ~fmt.FLAG_REMOVE_EXTRA_WHITESPACES)
    sp_ws = variant(sp, flags=sp.flags | fmt.FLAG_REMOVE_EXTRA_WHITESPACES)
    s_bos, s_eos = sp.pieces.index(b"<s>"), sp.pieces.index(b"</s>")
    ids = {s: bpe.pieces.index(s.encode()) for s in SPECIALS}
    toks = {
        "sp.bin": sp_plain,
        "sp_ws.bin": sp_ws,
        "gpt2.bin": variant(bpe, pretokenizer=fmt.PRETOK_GPT2),
        "smollm.bin": variant(bpe, pretokenizer=fmt.PRETOK_SMOLLM),
        "llama3.bin": variant(bpe, pretokenizer=fmt.PRETOK_LLAMA3,
                              flags=bpe.flags | fmt.FLAG_IGNORE_MERGES | fmt.FLAG_ADD_BOS),
    }
    write(out / "sp.bin", toks["sp.bin"], fmt.ChatTemplate(fmt.CHAT_LLAMA2, s_eos), s_bos, s_eos, 1)
    write(out / "sp_ws.bin", toks["sp_ws.bin"],
          fmt.ChatTemplate(fmt.CHAT_LLAMA2, s_eos, "You are a helpful,  respectful assistant. "), s_bos, s_eos, 2)
    im_end, eot = ids["<|im_end|>"], ids["<|eot_id|>"]
    write(out / "gpt2.bin", toks["gpt2.bin"], fmt.ChatTemplate(fmt.CHAT_CHATML, im_end), ids["<|endoftext|>"], im_end, 3)
    write(out / "smollm.bin", toks["smollm.bin"],
          fmt.ChatTemplate(fmt.CHAT_CHATML, im_end, "You are a helpful AI assistant named SmolLM"), -1, im_end, 4)
    write(out / "llama3.bin", toks["llama3.bin"], fmt.ChatTemplate(fmt.CHAT_LLAMA3, eot, "\n Be brief. \n"),
          ids["<|begin_of_text|>"], eot, 5)
    return toks


# ----------------------------------------------------------------------------------------------
# seeds


def load_seeds(d: Path) -> None:
    cfg = fmt.Config(**TINY)
    t = random_tensors(cfg, 0)
    tok = byte_tokenizer(cfg.vocab_size)
    fmt.write_model(d / "kvc_f32", cfg, t, tok, fmt.ChatTemplate(fmt.CHAT_CHATML, 2, "Be brief."))
    fmt.write_model(d / "kvc_q8_0", cfg, fmt.quantize_model(t, fmt.Q8_0, 4), tok)
    # q4_1 layers beside q8_0 embeddings (as SmolLM2 ships): rows of 32, whole blocks
    blocks = fmt.Config(**{**TINY, "dim": 32, "hidden_dim": 32, "n_heads": 1}, head_dim=32)
    t4 = random_tensors(blocks, 3)
    q4 = fmt.quantize_model(t4, fmt.Q4_1) | {"tok_embeddings": fmt.quantize(t4["tok_embeddings"], fmt.Q8_0, 32)}
    fmt.write_model(d / "kvc_q4_1", blocks, q4, tok)
    untied = fmt.Config(**{**TINY, "n_kv_heads": 2}, shared_classifier=False, bos_id=-1, eos_id=-1)
    fmt.write_model(d / "kvc_untied", untied, random_tensors(untied, 1), tok, fmt.ChatTemplate(fmt.CHAT_LLAMA3, -1))
    # head_dim 32 (not dim / n_heads): the quantized cache types' groups of 32 fit it; with a key_mean for iq4_nl
    wide = fmt.Config(**{**TINY, "n_heads": 1, "n_kv_heads": 1}, head_dim=32)
    mean = np.random.default_rng(4).standard_normal(fmt.key_mean_shape(wide)).astype(np.float32)
    fmt.write_model(d / "kvc_head_dim_32", wide, random_tensors(wide, 2) | {fmt.KEY_MEAN: mean}, tok)
    write_llama2c(d / "llama2c_v0", cfg, t, 0)
    write_llama2c(d / "llama2c_v0_untied", untied, random_tensors(untied, 1), 0)
    write_llama2c(d / "llama2c_v1", cfg, t, 1)
    write_llama2c(d / "llama2c_v2", cfg, t, 2, group_size=4)


def tokenizer_bin(pieces: list[bytes], scores: list[float]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_bin(Path(tmp) / "t.bin", pieces, scores)
        return (Path(tmp) / "t.bin").read_bytes()


def tokenizer_seeds(d: Path, toks: dict[str, fmt.Tokenizer]) -> None:
    """kvc sections (first byte even: 2 * chat style) and tokenizer.bin files (odd, then vocab - 1)."""
    small = byte_tokenizer(16)
    (d / "kvc_bytes").write_bytes(b"\x00" + fmt.encode_tokenizer(small))
    (d / "kvc_bytes_chatml").write_bytes(b"\x02" + fmt.encode_tokenizer(small))
    sp = toks["sp.bin"]
    (d / "kvc_sp_llama2").write_bytes(b"\x04" + fmt.encode_tokenizer(sp))
    (d / "kvc_bpe_llama3").write_bytes(b"\x06" + fmt.encode_tokenizer(toks["llama3.bin"]))
    (d / "kvc_bpe_chatml").write_bytes(b"\x02" + fmt.encode_tokenizer(toks["smollm.bin"]))
    (d / "bin_bytes").write_bytes(b"\x01" + bytes([15]) + tokenizer_bin(small.pieces, small.scores))
    # llama2.c's layout: unk, bos, eos, some byte pieces, then scored pieces (U+2581 becomes a space)
    keep = [i for i, ty in enumerate(sp.types) if ty != fmt.BYTE][:200]
    bytes_ = [i for i, ty in enumerate(sp.types) if ty == fmt.BYTE][:40]
    order = keep[:3] + bytes_ + keep[3:]
    (d / "bin_sp").write_bytes(b"\x01" + bytes([len(order) - 1]) +
                               tokenizer_bin([sp.pieces[i] for i in order], [sp.scores[i] for i in order]))


def encode_seeds(d: Path) -> None:
    """First byte: model index (0..4), BOS (bit 6), special-token parsing (bit 7); then the text."""
    texts = [s.encode() for s in TEXTS] + BAD_UTF8
    for model in range(5):
        for i, text in enumerate(texts):
            flags = (0x80 if i % 2 else 0) | (0x40 if i % 3 == 0 else 0)
            (d / f"m{model}_{i:02d}").write_bytes(bytes([model | flags]) + text)


def decode_seeds(d: Path, toks: dict[str, fmt.Tokenizer]) -> None:
    """First byte: model index; second: the room given first; then int32 ids."""
    rng = np.random.default_rng(0)
    for model, tok in enumerate(toks.values()):
        n = len(tok.pieces)
        runs = [np.arange(min(n, 64)), rng.integers(0, n, 32), np.arange(n - 16, n), np.array([1, 2, 3]), np.array([], int)]
        for i, ids in enumerate(runs):
            room = [0, 255, 7, 1, 16][i]
            (d / f"m{model}_{i}").write_bytes(bytes([model, room]) + np.asarray(ids, "<i4").tobytes())
        (d / f"m{model}_bad").write_bytes(bytes([model, 8]) + struct.pack("<4i", 5, -1, n, 2**31 - 1))


def chat_seeds(d: Path) -> None:
    """First byte: model index, start (bit 6), generation prompt (bit 7); then NUL-separated role, content, ..."""
    convs = [
        [("user", "hello")],
        [("system", "Be brief."), ("user", "hi"), ("assistant", "hello there"), ("user", "bye")],
        [("user", "  padded  "), ("assistant", " <|im_end|> </s> "), ("user", "<s>[INST]")],
        [("system", ""), ("user", ""), ("assistant", "")],
        [("tool", "{\"x\": 1}"), ("user", "Café 😀\n\nnew lines")],
        [],
    ]
    for model in range(5):
        for i, conv in enumerate(convs):
            flags = (0x80 if i % 2 == 0 else 0) | (0x40 if i != 3 else 0)
            body = b"\0".join(f"{r}\0{c}".encode() for r, c in conv)
            (d / f"m{model}_{i}").write_bytes(bytes([model | flags]) + body)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "fuzz" / "build"
    toks = write_models(out / "models")
    for target in ("load", "tokenizer", "encode", "decode", "chat"):
        d = out / "seeds" / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    load_seeds(out / "seeds" / "load")
    tokenizer_seeds(out / "seeds" / "tokenizer", toks)
    encode_seeds(out / "seeds" / "encode")
    decode_seeds(out / "seeds" / "decode", toks)
    chat_seeds(out / "seeds" / "chat")
    counts = {d.name: len(list(d.iterdir())) for d in sorted((out / "seeds").iterdir()) if d.is_dir()}  # not .done
    print(f"fuzz seeds in {out / 'seeds'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
