"""The C sentencepiece-style tokenizer gives exactly sentencepiece's ids, and decodes back."""
from __future__ import annotations

import random

import pytest
import sentencepiece as spm

import kvc
from export.tokenizers import read_sentencepiece
from kvc import format as fmt
from helpers import random_tensors, write_llama2c, write_tokenizer_bin

CORPUS = [
    "Hello world", "Hello, world!", "hello   world", "  leading spaces", "trailing spaces   ", " ", "   ", "",
    "a", "tabs\tand\ttabs", "\tleading tab", "new\nlines\n\nand more\n", "\n", "\r\n windows\r\n",
    "1234567890", "3.14159 and 2,718", "0x1F 007 42nd", "version 1.2.3-beta",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; i++) { s += a[i]; }",
    "if x != None: print(f\"{x!r}\")", "<s> is not special here </s>", "<unk> <0x41>",
    "Café crème brûlée, naïve façade", "Ångström über straße", "ÆØÅ æøå", "Ελληνικά γράμματα", "Русский текст",
    "日本語のテキスト", "中文文本测试", "한국어 텍스트", "עברית", "العربية", "हिन्दी पाठ", "ไทย",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "math ∑ ∫ √ ≠ ≤ ∞", "quotes “curly” ‘single’ «guillemets»",
    "mixed  spaces \t tab  \n  newline", "end with newline\n", "multiple     internal      spaces",
    "repeated ........ dots!!!???", "URL https://example.com/a?b=c&d=e#f", "email a.b@c.de",
    "ALL CAPS SENTENCE", "camelCaseWordsAndSnake_case_words", "\u00a0non-breaking\u00a0space", "zero\u200bwidth",
    "control \x01\x02 chars", "ᚠᛇᚻ runes", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
]


def fuzz_strings(n: int, seed: int) -> list[str]:
    """Random strings mixing ASCII, spaces, digits and characters from many scripts."""
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()[]{}<>-_/\\\n\t") + list(
        "éüßñçøåЖжλΩ中文日本한글٣٤אב😀🎉∑→€£¥\u00a0\u2581▁")
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        out.append("".join(rng.choice(alphabet) if rng.random() < 0.9 else chr(rng.randint(0x20, 0x2FFF)) for _ in range(k)))
    return out


def model_with_tokenizer(path, tokenizer: fmt.Tokenizer) -> kvc.Model:
    """A tiny random model whose vocab is the tokenizer's, so the C engine loads it."""
    cfg = fmt.Config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                     vocab_size=len(tokenizer.pieces), seq_len=64)
    fmt.write_model(path, cfg, random_tensors(cfg, 0), tokenizer)
    return kvc.Model(path)


@pytest.fixture(scope="module")
def mistral(sp_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral") / "m.bin"
    return model_with_tokenizer(path, read_sentencepiece(sp_model)), spm.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BPE model trained here with sentencepiece's defaults (remove_extra_whitespaces on), byte fallback."""
    d = tmp_path_factory.mktemp("trained")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog kvc cache token model attention layer Ελληνικά 日本 über".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "sp"), model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(d / "sp.model"))
    tok = read_sentencepiece(d / "sp.model")
    assert tok.flags & fmt.FLAG_REMOVE_EXTRA_WHITESPACES
    return model_with_tokenizer(d / "m.bin", tok), sp


@pytest.mark.parametrize("which", ["mistral", "trained"])
def test_ids_identical_to_sentencepiece(which, request):
    model, sp = request.getfixturevalue(which)
    strings = CORPUS + fuzz_strings(300, seed=1)
    mismatches = [s for s in strings if model.encode(s, bos=False) != sp.encode(s)]
    assert not mismatches, f"{len(mismatches)}/{len(strings)} differ, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize("which", ["mistral", "trained"])
def test_decode_identical_to_sentencepiece(which, request):
    model, sp = request.getfixturevalue(which)
    for s in CORPUS + fuzz_strings(100, seed=2):
        ids = sp.encode(s)
        assert model.decode(ids) == sp.decode(ids), s


def test_known_mistral_ids(mistral):
    model, _ = mistral
    assert model.encode("Hello world", bos=False) == [22557, 1526]
    assert model.encode("Hello world") == [1, 22557, 1526]  # BOS first, as Llama/Mistral prompts start
    assert model.encode("1234567890", bos=False)[:3] == [28705, 28740, 28750]


def test_byte_fallback_spells_unknown_characters(mistral):
    model, sp = mistral
    ids = model.encode("\U0001F9EC", bos=False)  # not a piece: four <0xNN> byte tokens
    assert ids == sp.encode("\U0001F9EC")
    assert sum(sp.IsByte(i) for i in ids) == 4
    assert model.decode(ids) == "\U0001F9EC"


def test_llama2c_tokenizer_bin_gives_the_same_ids(mistral, sp_model, tmp_path):
    """The same vocab written as llama2.c's tokenizer.bin (spaces for U+2581) and loaded with -z."""
    model, sp = mistral
    tok = read_sentencepiece(sp_model)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", tok.pieces, tok.scores)
    cfg = fmt.Config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, seq_len=32)
    write_llama2c(tmp_path / "v0.bin", cfg, random_tensors(cfg, 0), version=0)  # legacy layout, shared classifier
    legacy = kvc.Model(tmp_path / "v0.bin", tokenizer=tmp_path / "tokenizer.bin")
    for s in CORPUS:
        assert legacy.encode(s, bos=False) == sp.encode(s), s
        assert legacy.decode(sp.encode(s)) == sp.decode(sp.encode(s)), s
