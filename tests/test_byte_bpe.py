"""Byte-level BPE details checked against Hugging Face `tokenizers` on tokenizers built here."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import kvc
from export.tokenizers import bytes_to_unicode, read_hf_tokenizer_json
from kvc import format as fmt
from helpers import random_tensors

WORDS = ["abc", "ab", "abcabc", " abc", "cab", "abcd", "x abc y", "aabbcc", "abcab"]


def build(tmp_path, ignore_merges: bool) -> tuple[kvc.Model, Tokenizer]:
    """256 byte tokens, "ab" (merged from a + b) and "abc", which no merge makes: only ignore_merges
    (Llama 3's setting) turns the word "abc" into that one token."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["ab"], vocab["abc"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = tmp_path / f"tokenizer-{ignore_merges}.json"
    tok.save(str(path))
    ours = read_hf_tokenizer_json(path, add_bos=False)
    assert bool(ours.flags & fmt.FLAG_IGNORE_MERGES) == ignore_merges
    cfg = fmt.Config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=258, seq_len=32,
                     bos_id=-1, eos_id=-1)
    fmt.write_model(tmp_path / f"m-{ignore_merges}.bin", cfg, random_tensors(cfg, 0), ours)
    return kvc.Model(tmp_path / f"m-{ignore_merges}.bin"), tok


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_matches_hf(tmp_path, ignore_merges):
    model, hf = build(tmp_path, ignore_merges)
    for word in WORDS:
        assert model.encode(word, bos=False) == hf.encode(word).ids, word
        assert model.decode(model.encode(word, bos=False)) == word
    assert (model.encode("abc", bos=False) == [257]) == ignore_merges
