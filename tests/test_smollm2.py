"""SmolLM2-135M-Instruct (f32 export of the Q4_1 GGUF) through the C engine.

C vs the torch reference (logits at every prompt position, 64 greedy tokens), the byte-level BPE
tokenizer vs Hugging Face `tokenizers`, streaming UTF-8 and the chat template vs the GGUF's own
jinja template.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

import kvc
from helpers import conversation

# A real sentence; its first 32 tokens are the prompt of the reference comparison.
SENTENCE = ("Once upon a time, in a small village nestled between rolling hills and a quiet river, there lived "
            "an old clockmaker who repaired every clock in town, and the children loved to watch him work.")
PROMPT_LEN = 32
GREEDY_STEPS = 64
LOGIT_TOL = 1e-3


@pytest.fixture(scope="module")
def model(smollm2_bin):
    # one thread: OpenMP's spinning threads collapse when another process shares the 2 cores
    return kvc.Model(smollm2_bin, seq_len=512, threads=1)


@pytest.fixture(scope="module")
def prompt_ids(model):
    ids = model.encode(SENTENCE, bos=False)
    assert len(ids) >= PROMPT_LEN
    return ids[:PROMPT_LEN]


@pytest.fixture(scope="module")
def reference(smollm2_bin, prompt_ids):
    """The torch reference's logits (no cache, forward_full) and greedy tokens (cache path)."""
    import torch

    from kvc.reference import Llama

    # one thread: torch's two OpenMP threads run ~20x slower when another process takes a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Llama.load(smollm2_bin)
        logits = ref.forward_full(prompt_ids)
        tokens = ref.greedy(prompt_ids, GREEDY_STEPS)
    finally:
        torch.set_num_threads(threads)
    return logits, tokens


@pytest.fixture(scope="module")
def c_run(model, prompt_ids):
    """The C engine's logits at every prompt position and its greedy argmax continuation."""
    model.reset()
    logits = model.forward(prompt_ids, 0)
    out, last, pos = [], logits[-1], len(prompt_ids)
    for _ in range(GREEDY_STEPS):
        out.append(int(np.argmax(last)))
        last = model.forward([out[-1]], pos)[-1]
        pos += 1
    return logits, out


# -- C vs the torch reference -----------------------------------------------------------------------


def test_prompt_is_a_real_32_token_sentence(model, prompt_ids):
    assert len(prompt_ids) == PROMPT_LEN
    assert model.decode(prompt_ids).startswith("Once upon a time, in a small village")


def test_logits_match_reference_at_every_position(c_run, reference):
    c_logits, _ = c_run
    ref_logits, _ = reference
    assert c_logits.shape == ref_logits.shape == (PROMPT_LEN, 49152)
    diff = np.abs(c_logits - ref_logits).max(axis=1)
    print(f"max |logit diff| per position: max {diff.max():.3g}, mean {diff.mean():.3g}")
    assert np.isfinite(c_logits).all()
    assert diff.max() <= LOGIT_TOL, f"positions over {LOGIT_TOL}: {np.nonzero(diff > LOGIT_TOL)[0].tolist()}"
    assert (c_logits.argmax(1) == ref_logits.argmax(1)).all()


def test_greedy_64_tokens_match_reference(c_run, reference):
    _, c_tokens = c_run
    _, ref_tokens = reference
    assert len(ref_tokens) == GREEDY_STEPS
    assert c_tokens == ref_tokens
    assert len(set(c_tokens)) > 8  # a real continuation, not one token repeated


def test_generate_greedy_text_matches_the_argmax_loop(model, prompt_ids, c_run):
    """generate(temperature=0) (prefill in one call, sampler, streaming decode) gives the same text."""
    _, c_tokens = c_run
    prompt = model.decode(prompt_ids)
    assert model.encode(prompt, bos=True) == prompt_ids
    text = "".join(model.generate(prompt, max_tokens=GREEDY_STEPS, temperature=0))
    assert model.stats.prompt_tokens == PROMPT_LEN and model.stats.cached_tokens == 0
    assert model.stats.generated_tokens == GREEDY_STEPS and model.stats.stop_reason == "length"
    assert text == model.decode(c_tokens)


def test_capital_of_france_is_paris(model):
    text = "".join(model.generate("The capital of France is", max_tokens=8, temperature=0))
    assert text.startswith(" Paris"), text


# -- byte-level BPE vs Hugging Face tokenizers ------------------------------------------------------

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<filename>")

CORPUS = [
    # ASCII prose, contractions, punctuation
    "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.", "a", "A", "I", "",
    "It's a dog's life, isn't it? We'll see; they'd've known. You're right, I'm sure.",
    "DON'T SHOUT! Don't whisper. don't 's 't 're 've 'm 'll 'd", "'quoted' \"double\" `back`",
    "Mr. O'Neil said: \"well...\" -- and left!", "e.g. i.e. etc. vs. a.k.a.", "hyphen-ated well-known state-of-the-art",
    "ALL CAPS SENTENCE", "camelCaseWordsAndSnake_case_words", "repeated ........ dots!!!???", "?!?!", "...",
    "URL https://example.com/a?b=c&d=e#f", "email a.b@c.de", "#hashtag @mention $dollar %percent ^caret &amp",
    # spaces, tabs, newlines, \r\n
    " ", "  ", "   ", "hello   world", "  leading spaces", "trailing spaces   ", "multiple     internal      spaces",
    "tabs\tand\ttabs", "\tleading tab", "\t\t\tdeep", "trailing tab\t", "new\nlines\n\nand more\n", "\n", "\n\n",
    "\n\n\n\n", "\r\n windows\r\n", "a\r\nb\r\n\r\nc", "\r", "mixed  spaces \t tab  \n  newline",
    "end with newline\n", " \n \n ", "word \n\tword", "  \n\n  x", "\u00a0non-breaking\u00a0space", "zero\u200bwidth",
    "\u3000ideographic space", "\x0bvertical\x0ctab and form feed", "control \x01\x02\x1f chars",
    # digits (SmolLM splits every digit)
    "1234567890", "0", "42", "3.14159 and 2,718", "0x1F 007 42nd", "version 1.2.3-beta", "1,000,000.00",
    "year 2024-11-22T16:44:00Z", "  12  345 ", "phone +1 (555) 123-4567", "١٢٣ Arabic-Indic ٤٥٦", "½ ¾ ² ³ ①",
    "abc123def456", "x1y22z333",
    # code
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; i++) { s += a[i]; }",
    "if x != None: print(f\"{x!r}\")", "#include <stdio.h>\nint main(void) { return 0; }\n",
    "const add = (a, b) => a + b;\n", "SELECT * FROM users WHERE id = 42;", "<div class=\"x\">hi</div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}", "    indented four\n        eight\n", "x=>x*2||y&&z",
    "fn main() {\n\tprintln!(\"{}\", 1);\n}", "$ ls -la | grep '.py' > out.txt 2>&1", "a_b-c.d/e\\f",
    # accents, Latin-1 and beyond
    "Café crème brûlée, naïve façade", "Ångström über straße", "ÆØÅ æøå", "Ça va? Où êtes-vous?",
    "niño año señor", "Łódź Kraków Gdańsk", "Çağrı İstanbul ığüşö", "Việt Nam tiếng Việt",
    # Greek, Cyrillic, CJK, Arabic, Hebrew, Devanagari, others
    "Ελληνικά γράμματα", "Καλημέρα κόσμε", "Русский текст", "Привет, мир! Как дела?", "Українська мова",
    "日本語のテキスト", "中文文本测试", "你好，世界！", "東京は日本の首都です。", "한국어 텍스트", "안녕하세요 세계",
    "עברית", "שלום עולם", "العربية", "مرحبا بالعالم", "हिन्दी पाठ", "नमस्ते दुनिया", "ไทย", "สวัสดีชาวโลก",
    "ᚠᛇᚻ runes", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters", "math ∑ ∫ √ ≠ ≤ ∞", "quotes “curly” ‘single’ «guillemets»",
    "arrows → ← ↔ ⇒", "currency € £ ¥ ₹ ₿", "box ┌─┐│└┘", "Ω≈ç√∫˜µ≤≥÷", "Ⅻ ⅷ", "ﬁ ﬂ ligatures",
    "e\u0301 combining acute", "a\u0308o\u0308u\u0308", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    # emoji incl. ZWJ sequences, skin tones, flags, keycaps
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "😀", "🎉🎉🎉", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "1️⃣ #️⃣", "❤️ ♥",
    "I love 🍕 and 🍣!", "🇯🇵🇺🇸🇩🇪", "🧑‍💻 coding", "text😀text", " 😀 ", "🫠 🫶",
    # special tokens written literally
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "before<|endoftext|>after", "<|im_end|><|im_end|>", " <|im_start|> spaced <|im_end|> ",
    "<|im_start|>", "<|im_start", "im_start|>", "<|im_start|x", "<repo_name>kvc<file_sep>", "<s> and </s> are text",
    "<unk> <0x41>", "<|notatoken|>",
]


def fuzz_strings(n: int, seed: int) -> list[str]:
    """Random strings mixing ASCII, whitespace, digits, many scripts, emoji and special tokens."""
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()[]{}<>|-_/\\\n\t\r") + list(
        "éüßñçøåЖжλΩ中文日本한글٣٤אבनम😀🎉👍🏽∑→€£¥\u00a0\u200d\u0301\u3000\ufe0f")
    pieces = ["'s", "'ll", "  ", "\r\n", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "👨‍👩‍👧", "🇫🇷"]
    out = []
    for _ in range(n):
        k = rng.randint(1, 48)
        chars = []
        for _ in range(k):
            r = rng.random()
            if r < 0.8:
                chars.append(rng.choice(alphabet))
            elif r < 0.9:
                chars.append(rng.choice(pieces))
            else:  # anything in the BMP outside surrogates, or an astral character
                cp = rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x1FAFF)])
                chars.append(chr(cp))
        out.append("".join(chars))
    return out


ALL_STRINGS = CORPUS + fuzz_strings(200, seed=1234)


@pytest.mark.parametrize("special", [True, False])
def test_tokenizer_ids_identical_to_hf_tokenizers(model, hf_tok, special):
    """special=True parses spelled-out control tokens as HF does by default; special=False keeps them
    text, as HF does with encode_special_tokens set."""
    assert len(ALL_STRINGS) >= 200
    assert sum("<|im_end|>" in s for s in ALL_STRINGS) >= 3  # the corpus spells control tokens
    hf_tok.encode_special_tokens = not special
    try:
        mismatches = []
        for s in ALL_STRINGS:
            ours = model.encode(s, bos=False, special=special)
            theirs = hf_tok.encode(s, add_special_tokens=False).ids
            if ours != theirs:
                mismatches.append((s, ours, theirs))
    finally:
        hf_tok.encode_special_tokens = False
    print(f"tokenizer: {len(ALL_STRINGS) - len(mismatches)}/{len(ALL_STRINGS)} strings give identical ids")
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[:3]}"


def test_known_ids(model):
    """SmolLM splits every digit; ChatML control tokens are 1 and 2; no BOS is added."""
    assert model.encode("1234567890", bos=False) == model.encode("1234567890", bos=True)
    assert len(model.encode("1234567890", bos=False)) == 10
    assert model.encode("<|im_start|>user\nhi<|im_end|>", bos=False, special=True)[0] == 1
    assert model.encode("<|im_start|>user\nhi<|im_end|>", bos=False, special=True)[-1] == 2
    plain = model.encode("<|im_start|>user\nhi<|im_end|>", bos=False)  # by default text is text
    assert 1 not in plain and 2 not in plain and model.decode(plain) == "<|im_start|>user\nhi<|im_end|>"


def test_decode_round_trips(model):
    """decode(encode(s)) == s for text without special tokens (control tokens decode to nothing)."""
    checked, failures = 0, []
    for s in ALL_STRINGS:
        if any(sp in s for sp in SPECIALS):
            continue
        checked += 1
        back = model.decode(model.encode(s, bos=False))
        if back != s:
            failures.append((s, back))
    print(f"decode round trip: {checked - len(failures)}/{checked} strings")
    assert checked >= 200
    assert not failures, f"{len(failures)} differ, first: {failures[:3]}"


def test_generate_streams_whole_multi_token_characters(model):
    """Each 🎉 is three byte-level tokens; generate must yield it whole, never a partial or U+FFFD."""
    assert len(model.encode("🎉", bos=False)) == 3
    pieces = list(model.generate("Party emoji: 🎉🎉🎉🎉🎉", max_tokens=15, temperature=0))
    assert model.stats.generated_tokens == 15
    assert all(isinstance(p, str) and p for p in pieces)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces == ["🎉"] * 5, pieces


def test_generate_pieces_are_valid_text_after_zwj_prompt(model):
    """A ZWJ family prompt: the continuation mixes ZWJ sequences, each piece is whole characters."""
    prompt = "Emojis: 👨‍👩‍👧 👨‍👩‍👧 👨‍👩‍👧"
    ids = model.encode(prompt, bos=True)
    model.reset()
    logits = model.forward(ids, 0)
    tokens = []
    for i in range(12):
        tokens.append(int(np.argmax(logits[-1])))
        logits = model.forward([tokens[-1]], len(ids) + i)
    # stop where the greedy tokens end on a character boundary, so no partial tail is flushed
    # (decode turns an incomplete trailing character into U+FFFD)
    n = max(k for k in range(1, 13) if "\ufffd" not in model.decode(tokens[:k]))
    pieces = list(model.generate(prompt, max_tokens=n, temperature=0))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == model.decode(tokens[:n])
    assert "\ufffd" not in "".join(pieces)
    assert len(pieces) < model.stats.generated_tokens  # multi-token characters came out whole


def test_model_close_and_context_manager(smollm2_bin):
    """Model.close() frees the C model now; `with kvc.Model(...)` closes on exit."""
    m = kvc.Model(smollm2_bin, seq_len=16, threads=1)
    m.close()
    with pytest.raises(ValueError):
        m.forward([1], 0)
    with kvc.Model(smollm2_bin, seq_len=16, threads=1) as m2:
        assert m2.encode("hi", bos=False) == [6004]
    m2.close()  # closing twice is harmless


# -- chat template vs the GGUF's jinja template -----------------------------------------------------


TURNS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("And of Germany?\nAnswer in one word.", "Berlin."),
    ("Write  a haiku  about café ☕ and 日本.", "Steam rises, slowly\n  a quiet cup at dawn\n"),
]


@pytest.mark.parametrize("system", [None, "You are a pirate. Answer\tin pirate speak."], ids=["default-system", "system"])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_chat_tokens_match_the_gguf_template(model, hf_tok, gguf_template, turns, system):
    msgs = conversation(TURNS[:turns], system)
    text = gguf_template.render(messages=msgs, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    if system is None:
        assert "named SmolLM" in text
    expected = hf_tok.encode(text, add_special_tokens=False).ids
    assert model.chat_tokens(msgs) == expected


def test_chat_tokens_without_generation_prompt(model, hf_tok, gguf_template):
    msgs = conversation(TURNS[:2], None) + [{"role": "assistant", "content": "Berlin."}]
    text = gguf_template.render(messages=msgs, add_generation_prompt=False)
    assert model.chat_tokens(msgs, add_generation_prompt=False) == hf_tok.encode(text, add_special_tokens=False).ids
