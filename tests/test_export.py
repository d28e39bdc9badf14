"""export/: Hugging Face, Meta and llama2.c sources -> kvc file, checked against independent references."""
from __future__ import annotations

import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export import export_model
from export.__main__ import main
from export.common import permute_hf_rope
from export.tokenizers import bytes_to_unicode, read_sentencepiece
from helpers import ROOT, byte_tokenizer, random_tensors, write_llama2c, write_tokenizer_bin
from kvc.format import (
    BYTE, CHAT_CHATML, CONTROL, FLAG_ADD_BOS, FLAG_ADD_DUMMY_PREFIX, FLAG_BYTE_FALLBACK, LLAMA2C_MAGIC, MATRICES, NORMAL,
    PRETOK_SMOLLM, Q8_0, TOK_BYTE_BPE, UNKNOWN, ChatTemplate, Checkpoint, Config, quantize_q8_0, read_llama2c_header,
    as_float, read_model, tensor_shapes, write_model,
)
from kvc.reference import Llama

TOKENS = [0, 5, 17, 3, 99, 42, 7, 250, 1, 64, 128, 31]  # 12 positions, ids < every test vocab

# ----------------------------------------------------------------------------------------------
# a small byte-level BPE tokenizer.json + ChatML template for the HF folders

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "i n", "Ġt he", "e r", "a n", "o n", "Ġ a", "r e", "Ġ s"]
HF_VOCAB = len(SPECIALS) + 256 + len(MERGES)
SYSTEM = "You are a tiny test model."
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_hf_tokenizer(folder: Path) -> None:
    """tokenizer.json (SmolLM-style pre-tokenizer) and tokenizer_config.json with a ChatML template."""
    b2u = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    for m in MERGES:
        vocab[m.replace(" ", "")] = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": MERGES},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.2), norm weights 1 + 0.1 N(0, 1): greedy is not one token repeated, norms matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_hf_folder(folder: Path, *, n_kv: int, tied: bool, theta: float, rope_form: str, weights: str,
                   seed: int = 0) -> np.ndarray:
    """Save a random transformers LlamaForCausalLM (dim 64, 8 heads of 16, so q_dim 128 != dim)
    and return its logits for TOKENS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=n_kv, head_dim=16, rope_theta=theta,
        rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    randomize(model, seed)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        model.save_pretrained(folder)
    elif weights == "sharded":
        model.save_pretrained(folder, max_shard_size="60KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.config.save_pretrained(folder)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    cj = json.loads((folder / "config.json").read_text())
    if rope_form == "top":
        cj.pop("rope_parameters", None)
        cj["rope_theta"] = theta
    else:
        assert cj["rope_parameters"] == {"rope_theta": theta, "rope_type": "default"}
        cj.pop("rope_theta", None)
    (folder / "config.json").write_text(json.dumps(cj))
    write_hf_tokenizer(folder)
    return logits


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


HF_CASES = [
    # n_kv, tied, theta, rope_form, weights
    (2, False, 1e5, "parameters", "safetensors"),  # GQA, untied
    (2, True, 1e4, "top", "sharded"),  # GQA, tied, sharded safetensors with index
    (8, False, 1e4, "top", "pytorch"),  # MHA, pytorch_model.bin
    (1, True, 5e5, "parameters", "safetensors"),  # MQA, tied
]


@pytest.mark.parametrize("n_kv,tied,theta,rope_form,weights", HF_CASES)
def test_hf_folder_matches_transformers(tmp_path, n_kv, tied, theta, rope_form, weights):
    src = tmp_path / "hf"
    ref = make_hf_folder(src, n_kv=n_kv, tied=tied, theta=theta, rope_form=rope_form, weights=weights, seed=n_kv)
    out = tmp_path / "m.bin"
    export_model(src, out)
    ck = read_model(out)
    c = ck.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (64, 96, 2, 8, n_kv, 16)
    assert (c.vocab_size, c.seq_len, c.rope_theta, c.bos_id, c.eos_id) == (HF_VOCAB, 128, theta, 1, 2)
    assert np.float32(c.norm_eps) == np.float32(1e-5)
    assert c.shared_classifier == tied and ("wcls" in ck.tensors) == (not tied)
    model = Llama(ck)
    full = model.forward_full(TOKENS)
    cached = model.forward(TOKENS)
    d = max_diff(full, ref)
    print(f"HF n_kv={n_kv} tied={tied}: max |logit diff| vs transformers = {d:.2e}")
    assert d <= 1e-4
    assert max_diff(cached, ref) <= 1e-4
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits


def test_hf_wk_permutation_uses_kv_heads(tmp_path):
    """Permuting wk with n_heads instead of n_kv_heads (llama2.c's GQA bug) must break the logits."""
    src = tmp_path / "hf"
    ref = make_hf_folder(src, n_kv=2, tied=False, theta=1e4, rope_form="top", weights="safetensors", seed=7)
    out = tmp_path / "m.bin"
    export_model(src, out)
    ck = read_model(out)
    assert max_diff(Llama(ck).forward_full(TOKENS), ref) <= 1e-4

    from safetensors.numpy import load_file

    hf = load_file(src / "model.safetensors")
    wrong = dict(ck.tensors)
    kv = [hf[f"model.layers.{l}.self_attn.k_proj.weight"] for l in range(2)]
    assert np.array_equal(np.stack([permute_hf_rope(w, 2, 16) for w in kv]), ck.tensors["wk"])  # what export did
    wrong["wk"] = np.stack([_llama2c_style_wk(w, n_heads=8, dim=64) for w in kv])
    d = max_diff(Llama(Checkpoint(ck.config, wrong, None, ChatTemplate())).forward_full(TOKENS), ref)
    print(f"wk permuted with n_heads: max |logit diff| = {d:.2f}")
    assert d > 0.1


def _llama2c_style_wk(w: np.ndarray, n_heads: int, dim: int) -> np.ndarray:
    """llama2.c export.py's permute_reverse for wk: uses n_heads and dim even under GQA."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, dim).transpose(0, 2, 1, 3).reshape(out, dim)


def test_hf_tokenizer_and_chat_template(tmp_path):
    src = tmp_path / "hf"
    make_hf_folder(src, n_kv=2, tied=True, theta=1e4, rope_form="top", weights="safetensors")
    out = tmp_path / "m.bin"
    export_model(src, out)
    ck = read_model(out)
    tok = ck.tokenizer
    assert tok.kind == TOK_BYTE_BPE and tok.pretokenizer == PRETOK_SMOLLM and tok.flags == 0
    assert tok.pieces[:3] == [s.encode() for s in SPECIALS] and tok.types[:3] == [CONTROL] * 3
    assert [tok.pieces[3 + b] for b in range(256)] == [bytes([b]) for b in range(256)]  # raw bytes, not GPT-2 unicode
    assert tok.pieces[3 + 256 + 3] == b" the" and tok.types[3 + 256 + 3] == NORMAL
    ids = {p: i for i, p in enumerate(tok.pieces)}
    assert tok.merges[0] == (ids[b" "], ids[b"t"]) and tok.merges[3] == (ids[b" t"], ids[b"he"])
    assert len(tok.merges) == len(MERGES)
    # the tokenizer.json is valid for HF tokenizers, and its ids spell the text in kvc's pieces
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    text = "<|im_start|>the other 42 is in there<|im_end|>"
    enc = hf.encode(text).ids
    assert enc[0] == 1 and enc[-1] == 2 and ids[b" the"] in enc
    assert b"".join(tok.pieces[i] for i in enc) == text.encode()
    t = ck.template
    assert (t.style, t.end_of_turn, t.default_system, t.jinja) == (CHAT_CHATML, 2, SYSTEM, CHATML)
    # BOS: from tokenizer_config.json's add_bos_token, else from a post_processor that prepends one
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "add_bos_token": True}))
    export_model(src, out)
    assert read_model(out).tokenizer.flags == FLAG_ADD_BOS
    (src / "tokenizer_config.json").write_text("{}")
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    export_model(src, out)
    ck = read_model(out)
    assert ck.tokenizer.flags == FLAG_ADD_BOS and ck.template.style == 0 and ck.template.jinja == ""


def test_q8_0_export(tmp_path):
    src = tmp_path / "hf"
    ref = make_hf_folder(src, n_kv=2, tied=False, theta=1e4, rope_form="top", weights="safetensors", seed=3)
    out = tmp_path / "q.bin"
    export_model(src, out, dtype="q8_0", group_size=32)
    ck = read_model(out)
    assert all(ck.tensors[m].type == Q8_0 and ck.tensors[m].group_size == 32 for m in MATRICES if m in ck.tensors)
    got = Llama(ck).forward_full(TOKENS)
    print(f"q8_0 gs32: max |logit diff| vs transformers fp32 = {max_diff(got, ref):.3f}, "
          f"top-1 agreement {np.mean(got.argmax(-1) == ref.argmax(-1)):.2f}")
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9
    assert max_diff(got, ref) < 0.05 * np.abs(ref).max()
    assert main([str(src), str(tmp_path / "bad.bin"), "--dtype", "q8_0", "--group-size", "60"]) == 1


def test_seq_len_override(tmp_path):
    src = tmp_path / "hf"
    make_hf_folder(src, n_kv=2, tied=True, theta=1e4, rope_form="top", weights="safetensors")
    export_model(src, tmp_path / "m.bin", seq_len=64)
    assert read_model(tmp_path / "m.bin").config.seq_len == 64


# ----------------------------------------------------------------------------------------------
# Meta folders


def meta_weights(p: dict, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    dim, nh = p["dim"], p["n_heads"]
    nkv = p.get("n_kv_heads") or nh
    hd = dim // nh
    hidden = 224  # dim 64, multiple_of 32, ffn_dim_multiplier 1.3 -> int(1.3 * 170) = 221 -> 224
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return 0.2 * torch.randn(shape, generator=g)

    def norm():
        return 1 + 0.1 * torch.randn(dim, generator=g)

    w = {"tok_embeddings.weight": rnd(vocab, dim), "norm.weight": norm(), "output.weight": rnd(vocab, dim)}
    for l in range(p["n_layers"]):
        w.update({
            f"layers.{l}.attention.wq.weight": rnd(nh * hd, dim),
            f"layers.{l}.attention.wk.weight": rnd(nkv * hd, dim),
            f"layers.{l}.attention.wv.weight": rnd(nkv * hd, dim),
            f"layers.{l}.attention.wo.weight": rnd(dim, nh * hd),
            f"layers.{l}.feed_forward.w1.weight": rnd(hidden, dim),
            f"layers.{l}.feed_forward.w2.weight": rnd(dim, hidden),
            f"layers.{l}.feed_forward.w3.weight": rnd(hidden, dim),
            f"layers.{l}.attention_norm.weight": norm(),
            f"layers.{l}.ffn_norm.weight": norm(),
        })
    return w


def meta_forward(w: dict[str, torch.Tensor], p: dict, tokens: list[int]) -> np.ndarray:
    """Meta's llama/model.py forward, condensed: complex-number RoPE on interleaved pairs, repeat_kv."""
    dim, nh = p["dim"], p["n_heads"]
    nkv = p.get("n_kv_heads") or nh
    hd, T, eps = dim // nh, len(tokens), p["norm_eps"]
    theta = p.get("rope_theta", 10000.0)
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rot(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2)

    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    h = w["tok_embeddings.weight"][torch.tensor(tokens)]
    for l in range(p["n_layers"]):
        a = lambda n: w[f"layers.{l}.{n}.weight"]  # noqa: E731
        x = rms(h, a("attention_norm"))
        q = rot((x @ a("attention.wq").T).view(T, nh, hd))
        k = rot((x @ a("attention.wk").T).view(T, nkv, hd))
        v = (x @ a("attention.wv").T).view(T, nkv, hd)
        k = k[:, :, None, :].expand(T, nkv, nh // nkv, hd).reshape(T, nh, hd)
        v = v[:, :, None, :].expand(T, nkv, nh // nkv, hd).reshape(T, nh, hd)
        s = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / math.sqrt(hd) + mask
        o = (torch.softmax(s, -1) @ v.transpose(0, 1)).transpose(0, 1).reshape(T, nh * hd)
        h = h + o @ a("attention.wo").T
        x = rms(h, a("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ a("feed_forward.w1").T) * (x @ a("feed_forward.w3").T)) @ a("feed_forward.w2").T
    return (rms(h, w["norm.weight"]) @ w["output.weight"].T).numpy()


def shard(w: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split like Meta's model parallelism: column-parallel on dim 0, wo/w2/tok_embeddings on dim 1."""
    out = [{} for _ in range(n)]
    for k, v in w.items():
        if "norm" in k:
            parts = [v.clone()] * n
        elif any(s in k for s in ("attention.wo", "feed_forward.w2", "tok_embeddings")):
            parts = v.chunk(n, dim=1)
        else:
            parts = v.chunk(n, dim=0)
        for i in range(n):
            out[i][k] = parts[i].clone()
    return out


@pytest.mark.parametrize("n_shards,n_kv,vocab_field,theta", [(1, None, 32000, None), (2, 2, -1, 5e5)])
def test_meta_folder(tmp_path, sp_model, n_shards, n_kv, vocab_field, theta):
    p = {"dim": 64, "n_layers": 2, "n_heads": 8, "vocab_size": vocab_field, "multiple_of": 32,
         "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}
    if n_kv:
        p["n_kv_heads"] = n_kv
    if theta:
        p["rope_theta"] = theta
    w = meta_weights(p, 32000, seed=n_shards)
    folder = tmp_path / "llama" / "7B"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(p))
    (folder.parent / "tokenizer.model").write_bytes(sp_model.read_bytes())  # Meta keeps it one level up
    for i, s in enumerate(shard(w, n_shards)):
        torch.save(s, folder / f"consolidated.{i:02d}.pth")
    out = tmp_path / "m.bin"
    export_model(folder, out)
    ck = read_model(out)
    c = ck.config
    assert (c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (64, 224, 8, n_kv or 8, 32000)
    assert (c.rope_theta, c.seq_len, c.shared_classifier) == (theta or 1e4, 2048, False)
    assert len(ck.tokenizer.pieces) == 32000
    ref = meta_forward(w, p, TOKENS)
    d = max_diff(Llama(ck).forward_full(TOKENS), ref)
    print(f"Meta {n_shards} shard(s): max |logit diff| = {d:.2e}")
    assert d <= 1e-4


# ----------------------------------------------------------------------------------------------
# llama2.c checkpoints

L2C = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)
L2C_WORDS = [" the", " a", "hello", " world", "in", "er"]


def write_l2c_tokenizer(path: Path, vocab: int) -> list[tuple[bytes, float]]:
    """llama2.c's tokenizer.bin of `vocab` pieces (spaces, not U+2581); returns (piece, score) as written."""
    toks = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    toks += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    toks += [(w.encode(), -float(i)) for i, w in enumerate(L2C_WORDS)]
    toks += [(f"tok{i}".encode(), -100.0 - i) for i in range(vocab - len(toks))]
    write_tokenizer_bin(path, [p for p, _ in toks], [s for _, s in toks])
    return toks


@pytest.mark.parametrize("version,shared", [(0, True), (0, False), (1, False), (1, True), (2, False)])
def test_llama2c(tmp_path, version, shared):
    c = Config(**{**L2C.__dict__, "shared_classifier": shared})
    t = random_tensors(c, seed=version)
    src, tokbin, out = tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "out.bin"
    write_llama2c(src, c, t, version)
    toks = write_l2c_tokenizer(tokbin, c.vocab_size)
    export_model(src, out, tokenizer=tokbin)
    ck = read_model(out)
    assert (ck.config.dim, ck.config.n_kv_heads, ck.config.rope_theta, ck.config.norm_eps) == (64, 2, 1e4, np.float32(1e-5))
    assert (ck.config.bos_id, ck.config.eos_id, ck.config.shared_classifier) == (1, 2, shared)
    expect = t
    if version == 2:  # the source holds q8_0 weights: export must reproduce their dequantized values
        expect = {n: a if n.startswith("rms") else (lambda q, s: (q.reshape(-1, 32).astype(np.float32) * s[:, None])
                  .reshape(a.shape))(*quantize_q8_0(a, 32)) for n, a in t.items()}
    for name, _ in tensor_shapes(c):  # v2's q8_0 matrices stay q8_0
        assert np.array_equal(as_float(ck.tensors[name]), expect[name]), name
    d = max_diff(Llama(ck).forward_full(TOKENS), Llama(Checkpoint(c, expect, None, ChatTemplate())).forward_full(TOKENS))
    assert d == 0.0
    tok = ck.tokenizer
    assert tok.pieces[3 + 256] == "\u2581the".encode()  # llama2.c's spaces back to U+2581
    assert [tok.scores[i] for i in range(len(toks))] == [s for _, s in toks]
    assert tok.types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE] and tok.types[3 + 256] == NORMAL
    assert tok.flags == FLAG_ADD_DUMMY_PREFIX | FLAG_BYTE_FALLBACK | FLAG_ADD_BOS


def test_llama2c_with_sentencepiece_tokenizer(tmp_path, sp_model):
    c = Config(**{**L2C.__dict__, "vocab_size": 32000})
    write_llama2c(tmp_path / "model.bin", c, random_tensors(c, seed=5), version=1)
    export_model(tmp_path / "model.bin", tmp_path / "out.bin", tokenizer=sp_model)
    tok = read_model(tmp_path / "out.bin").tokenizer
    assert len(tok.pieces) == 32000 and tok.pieces[22557] == "\u2581Hello".encode()


# ----------------------------------------------------------------------------------------------
# tokenizers


def test_sentencepiece_tokenizer(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = read_sentencepiece(sp_model)
    n = sp.get_piece_size()
    assert n == len(tok.pieces) == 32000
    assert tok.flags == FLAG_ADD_DUMMY_PREFIX | FLAG_BYTE_FALLBACK | FLAG_ADD_BOS  # remove_extra_whitespaces off
    assert read_sentencepiece(sp_model, add_bos=False).flags == FLAG_ADD_DUMMY_PREFIX | FLAG_BYTE_FALLBACK
    assert tok.unk_id == sp.unk_id() == 0
    assert tok.pieces == [sp.id_to_piece(i).encode() for i in range(n)]
    assert tok.scores == [sp.get_score(i) for i in range(n)]

    def sp_type(i):
        for typ, pred in ((CONTROL, sp.is_control), (UNKNOWN, sp.is_unknown), (BYTE, sp.is_byte), (5, sp.is_unused)):
            if pred(i):
                return typ
        return NORMAL

    assert tok.types == [sp_type(i) for i in range(n)]
    assert tok.types[1:3] == [CONTROL, CONTROL] and tok.types[3:259] == [BYTE] * 256
    assert tok.pieces[3] == b"<0x00>" and tok.pieces[258] == b"<0xFF>"


# ----------------------------------------------------------------------------------------------
# bad input: one error line, non-zero exit, nothing written


def _run_main(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name)], "temp file left behind"


def _edit_safetensors(path: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(path)
    fn(t)
    save_file(t, path)


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    make_hf_folder(tmp_path / "hf", n_kv=2, tied=False, theta=1e4, rope_form="top", weights="safetensors")
    (tmp_path / "out").mkdir()
    return tmp_path / "hf"


def test_error_unknown_architecture(hf_folder, capsys):
    cj = json.loads((hf_folder / "config.json").read_text())
    cj["architectures"] = ["GPT2LMHeadModel"]
    (hf_folder / "config.json").write_text(json.dumps(cj))
    out = hf_folder.parent / "out" / "m.bin"
    assert _run_main(capsys, [str(hf_folder), str(out)]) == "error: unsupported architecture GPT2LMHeadModel"
    _nothing_written(out)


def test_error_unsupported_rope_scaling(hf_folder, capsys):
    cj = json.loads((hf_folder / "config.json").read_text())
    cj["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    (hf_folder / "config.json").write_text(json.dumps(cj))
    out = hf_folder.parent / "out" / "m.bin"
    assert "unsupported rope scaling type 'llama3'" in _run_main(capsys, [str(hf_folder), str(out)])
    _nothing_written(out)


def test_error_missing_tensor(hf_folder, capsys):
    _edit_safetensors(hf_folder / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    out = hf_folder.parent / "out" / "m.bin"
    assert _run_main(capsys, [str(hf_folder), str(out)]) == "error: missing tensor model.layers.1.mlp.up_proj.weight"
    _nothing_written(out)


def test_error_wrong_shape(hf_folder, capsys):
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_safetensors(hf_folder / "model.safetensors", lambda t: t.__setitem__(name, np.zeros((128, 64), np.float32)))
    out = hf_folder.parent / "out" / "m.bin"
    err = _run_main(capsys, [str(hf_folder), str(out)])
    assert err == f"error: tensor {name} has shape (128, 64), expected (32, 64)"
    _nothing_written(out)


def test_error_tokenizer_vocab_mismatch(hf_folder, tmp_path, capsys):
    out = tmp_path / "out" / "m.bin"
    write_l2c_tokenizer(tmp_path / "tok.bin", 300)
    err = _run_main(capsys, [str(hf_folder), str(out), "--tokenizer", str(tmp_path / "tok.bin")])
    assert "300 tokens" in err and f"vocab is {HF_VOCAB}" in err
    _nothing_written(out)
    # the folder's own tokenizer.json short of the model's vocab
    tj = json.loads((hf_folder / "tokenizer.json").read_text())
    del tj["model"]["vocab"]["Ġs"]
    tj["model"]["merges"].remove("Ġ s")
    (hf_folder / "tokenizer.json").write_text(json.dumps(tj))
    err = _run_main(capsys, [str(hf_folder), str(out)])
    assert err == f"error: tokenizer has {HF_VOCAB - 1} tokens but the model's vocab is {HF_VOCAB}"
    _nothing_written(out)


def test_error_llama2c_without_tokenizer(tmp_path, capsys):
    write_llama2c(tmp_path / "model.bin", L2C, random_tensors(L2C, 0), version=1)
    out = tmp_path / "out.bin"
    assert "--tokenizer" in _run_main(capsys, [str(tmp_path / "model.bin"), str(out)])
    _nothing_written(out)
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:-10])
    write_l2c_tokenizer(tmp_path / "tok.bin", 300)
    assert "bytes" in _run_main(capsys, [str(tmp_path / "trunc.bin"), str(out), "--tokenizer", str(tmp_path / "tok.bin")])
    _nothing_written(out)


def test_cli_subprocess(hf_folder, tmp_path):
    """The real command line: exit 1, a single stderr line, no traceback; and success."""
    out = tmp_path / "out" / "m.bin"
    r = subprocess.run([sys.executable, "-m", "export", str(tmp_path / "nope"), str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "export", str(hf_folder), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_model(out).config.n_kv_heads == 2


# ----------------------------------------------------------------------------------------------
# hardening: signals, absurd and malformed input, non-float and non-finite weights, OUT vs SRC, mode

SIGNAL_CASES = [(signal.SIGINT, 130, "error: interrupted"), (signal.SIGTERM, 143, "error: interrupted by SIGTERM"),
                (signal.SIGHUP, 129, "error: interrupted by SIGHUP")]


def _default_signals() -> None:
    """In the exporter's process: the signals the test sends at their default action, even when pytest
    runs in a background job (which ignores SIGINT, and the exporter rightly keeps an ignored signal
    ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="module")
def big_llama2c(tmp_path_factory) -> tuple[Path, Path]:
    """A 337 MB llama2.c v1 checkpoint of zeros (sparse, instant to make) and its tokenizer.bin:
    exporting it to q8_0 spends about a second writing (quantizing as it goes)."""
    d = tmp_path_factory.mktemp("big")
    c = Config(dim=1024, hidden_dim=2816, n_layers=4, n_heads=16, n_kv_heads=16, vocab_size=32000, seq_len=256)
    head = struct.pack("<Ii7iB", LLAMA2C_MAGIC, 1, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                       c.vocab_size, c.seq_len, 1)
    with open(d / "big.bin", "wb") as f:
        f.write(head)
        f.truncate(read_llama2c_header(head + bytes(256 - len(head))).layout()[1])
    write_l2c_tokenizer(d / "tok.bin", c.vocab_size)
    return d / "big.bin", d / "tok.bin"


def _wait_for_temp_file(folder: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the exporter has created its temp file in `folder`: it is writing from then on."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(folder.glob("*.tmp")):
            return
        if proc.poll() is not None:
            pytest.fail(f"exporter exited ({proc.returncode}) before writing: {proc.stderr.read()}")
        time.sleep(0.001)
    pytest.fail("the exporter did not start writing in time")


@pytest.mark.parametrize("sig,code,line", SIGNAL_CASES, ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_mid_write_leaves_nothing(big_llama2c, tmp_path, sig, code, line):
    """A signal while the weights are written: one line, exit 128 + signal, no temp file left."""
    src, tok = big_llama2c
    out = tmp_path / "out" / "m.bin"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "export", str(src), str(out), "--tokenizer", str(tok),
                             "--dtype", "q8_0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    try:
        _wait_for_temp_file(out.parent, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err.strip()) == (code, line), err
    assert list(out.parent.iterdir()) == []


def test_signal_handlers_restored(tmp_path, capsys):
    """main() (as the tests call it) puts the process's own handlers back."""
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    _run_main(capsys, [str(tmp_path / "nope"), str(tmp_path / "out.bin")])
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == before


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """One random HF folder (GQA, untied, safetensors) that the cases below link to."""
    d = tmp_path_factory.mktemp("hfbase") / "hf"
    make_hf_folder(d, n_kv=2, tied=False, theta=1e4, rope_form="top", weights="safetensors")
    return d


def hf_variant(base: Path, dest: Path, config: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    """A copy of `base` at `dest`: its files linked, config.json updated with `config`, and `files`
    ({name: bytes}) written in place of the links."""
    dest.mkdir(parents=True)
    for f in base.iterdir():
        (dest / f.name).symlink_to(f)
    if config is not None:
        cj = {**json.loads((base / "config.json").read_text()), **config}
        files = {**(files or {}), "config.json": json.dumps(cj).encode()}
    for name, data in (files or {}).items():
        (dest / name).unlink(missing_ok=True)
        (dest / name).write_bytes(data)
    return dest


def _own_weights(base: Path) -> dict[str, bytes]:
    """hf_variant's `files` for a copy of the weights (not a link), to be edited in place."""
    return {"model.safetensors": (base / "model.safetensors").read_bytes()}


def _fails_cleanly(capsys, argv: list[str], *words: str) -> str:
    """main(argv) returns 1 with one `error:` line containing each of `words`, and writes nothing."""
    err = _run_main(capsys, argv)
    for w in words:
        assert w in err, err
    _nothing_written(Path(argv[1]))
    return err


@pytest.mark.parametrize("config,words", [
    ({"num_hidden_layers": 1e9}, ["missing tensor model.layers.2.input_layernorm.weight"]),
    ({"hidden_size": 10**9}, ["model.embed_tokens.weight", "expected", "1000000000"]),
    ({"intermediate_size": 10**9}, ["model.layers.0.mlp.gate_proj.weight", "1000000000"]),
    ({"vocab_size": 2**40}, ["vocab_size", "1099511627776"]),
    ({"max_position_embeddings": 2**31}, ["max_position_embeddings"]),
    ({"num_attention_heads": 10**6, "num_key_value_heads": 10**6}, ["model.layers.0.self_attn.q_proj.weight"]),
], ids=["layers1e9", "hidden1e9", "ffn1e9", "vocab2^40", "seq2^31", "heads1e6"])
def test_error_absurd_config_dims(hf_base, tmp_path, capsys, config, words):
    """Dims the files do not have are one error line, found before anything big is allocated."""
    src = hf_variant(hf_base, tmp_path / "hf", config)
    _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin")], *words)


@pytest.mark.parametrize("config,words", [
    ({"rope_theta": "abc"}, ["rope_theta", "'abc'"]),
    ({"rope_theta": -1.0}, ["rope_theta"]),
    ({"rms_norm_eps": None}, ["rms_norm_eps"]),
    ({"bos_token_id": "x"}, ["bos_token_id", "'x'"]),
    ({"eos_token_id": {"a": 1}}, ["eos_token_id"]),
    ({"architectures": 5}, ["architectures"]),
    ({"hidden_size": True}, ["hidden_size"]),
    ({"rope_parameters": "yarn"}, ["rope"]),
    ({"num_key_value_heads": 3}, ["not a multiple of 3"]),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_error_config_json_wrong_types(hf_base, tmp_path, capsys, config, words):
    src = hf_variant(hf_base, tmp_path / "hf", config)
    _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin")], "config.json", *words)


@pytest.mark.parametrize("data,words", [
    (b"[1, 2]", ["config.json", "JSON object"]),
    (b"\xff\xfe{}", ["config.json", "UTF-8"]),
    (b"{", ["config.json", "invalid JSON"]),
], ids=["list", "utf16", "truncated"])
def test_error_config_json_not_an_object(hf_base, tmp_path, capsys, data, words):
    src = hf_variant(hf_base, tmp_path / "hf", files={"config.json": data})
    err = _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin")], *words)
    assert "codec" not in err


def test_error_chat_template_not_utf8(hf_base, tmp_path, capsys):
    src = hf_variant(hf_base, tmp_path / "hf", files={"chat_template.jinja": b"{{ '\xff' }}"})
    _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin")], "chat_template.jinja", "UTF-8")


@pytest.fixture(scope="module")
def hf_vocab_llama2c(tmp_path_factory) -> tuple[Path, dict]:
    """A llama2.c checkpoint with HF_VOCAB tokens, and the tokenizer.json (as a dict) that fits it."""
    d = tmp_path_factory.mktemp("tokjson")
    c = Config(**{**L2C.__dict__, "vocab_size": HF_VOCAB})
    write_llama2c(d / "model.bin", c, random_tensors(c, seed=1), version=1)
    write_hf_tokenizer(d)
    return d / "model.bin", json.loads((d / "tokenizer.json").read_text())


def _set(path: str, value):
    """An edit of a tokenizer.json dict: the value at the dotted `path` becomes `value`."""
    def edit(j: dict) -> dict:
        *parents, last = path.split(".")
        for p in parents:
            j = j[p]
        j[last] = value
    return edit


TOKENIZER_JSON_CASES = {
    "empty_vocab": (lambda j: (_set("model.vocab", {})(j), _set("added_tokens", [])(j), _set("model.merges", [])(j)),
                    "vocabulary is empty"),
    "vocab_list": (_set("model.vocab", ["a", "b"]), "model.vocab"),
    "vocab_string": (_set("model.vocab", "abc"), "model.vocab"),
    "id_string": (_set("model.vocab.he", "x"), "'he'"),
    "id_negative": (_set("model.vocab.he", -5), "'he'"),
    "id_huge": (_set("model.vocab.he", 10**12), "not contiguous"),
    "added_not_list": (_set("added_tokens", {"id": 0}), "added_tokens"),
    "added_no_id": (_set("added_tokens", [{"content": "<x>"}]), "added token"),
    "merge_triple": (_set("model.merges", [["a", "b", "c"]]), "merge"),
    "merge_int": (_set("model.merges", [5]), "merge"),
    "merges_string": (_set("model.merges", "a b"), "merges"),
    "model_string": (_set("model", "BPE"), "model"),
    "pre_tokenizer_string": (_set("pre_tokenizer", "ByteLevel"), "pre_tokenizer"),
    "pre_tokenizer_steps": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [1, 2]}), "pre_tokenizer"),
    "split_pattern_string": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": "x"}, {"type": "ByteLevel", "use_regex": False}]}), "pre-tokenizer"),
    "post_processor_list": (_set("post_processor", [1]), "post_processor"),
    "template_single_int": (_set("post_processor", {"type": "TemplateProcessing", "single": [3]}), "post_processor"),
    "unk_token_list": (_set("model.unk_token", ["<unk>"]), "unk_token"),
    "normalizer_string": (lambda j: (_set("model.byte_fallback", True)(j), _set("normalizer", "x")(j)), "normalizer"),
}


@pytest.mark.parametrize("case", TOKENIZER_JSON_CASES)
def test_error_broken_tokenizer_json(hf_vocab_llama2c, tmp_path, capsys, case):
    """Every malformed tokenizer.json is one line naming the file and what is wrong."""
    src, spec = hf_vocab_llama2c
    edit, word = TOKENIZER_JSON_CASES[case]
    j = json.loads(json.dumps(spec))
    edit(j)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps(j))
    err = _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin"), "--tokenizer", str(tok)], str(tok), word)
    assert "arg is an empty sequence" not in err and "object has no attribute" not in err


def test_tokenizer_json_baseline_exports(hf_vocab_llama2c, tmp_path):
    """The unedited tokenizer.json of the cases above is fine."""
    src, spec = hf_vocab_llama2c
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    export_model(src, tmp_path / "m.bin", tokenizer=tmp_path / "tokenizer.json")
    assert len(read_model(tmp_path / "m.bin").tokenizer.pieces) == HF_VOCAB


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_error_non_float_tensor(hf_base, tmp_path, capsys, dtype):
    name = "model.layers.1.mlp.up_proj.weight"
    src = hf_variant(hf_base, tmp_path / "hf", files=_own_weights(hf_base))
    _edit_safetensors(src / "model.safetensors", lambda t: t.__setitem__(name, np.ones(t[name].shape, dtype)))
    err = _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin")], name)
    assert "dtype" in err and "float" in err


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_error_nonfinite_hf_weight(hf_base, tmp_path, capsys, value):
    name = "model.layers.1.self_attn.o_proj.weight"
    src = hf_variant(hf_base, tmp_path / "hf", files=_own_weights(hf_base))

    def poison(t):
        t[name] = t[name].copy()
        t[name][3, 5] = value
    _edit_safetensors(src / "model.safetensors", poison)
    _fails_cleanly(capsys, [str(src), str(tmp_path / "m.bin")], f"tensor {name} has NaN or Inf values")


def test_error_nonfinite_llama2c_weight(tmp_path, capsys):
    t = random_tensors(L2C, 0)
    t["w2"][1, 7, 3] = np.nan
    write_llama2c(tmp_path / "model.bin", L2C, t, version=1)
    write_l2c_tokenizer(tmp_path / "tok.bin", L2C.vocab_size)
    argv = [str(tmp_path / "model.bin"), str(tmp_path / "m.bin"), "--tokenizer", str(tmp_path / "tok.bin")]
    _fails_cleanly(capsys, argv, "tensor w2 (layer 1) has NaN or Inf values")


def test_write_model_refuses_nonfloat_and_nonfinite(tmp_path):
    t = random_tensors(L2C, 0)
    tok = byte_tokenizer(L2C.vocab_size)
    with pytest.raises(ValueError, match="tensor wq has dtype int32"):
        write_model(tmp_path / "a.bin", L2C, {**t, "wq": t["wq"].astype(np.int32)}, tok)
    bad = t["rms_final"].copy()
    bad[0] = np.inf
    with pytest.raises(ValueError, match="tensor rms_final has NaN or Inf values"):
        write_model(tmp_path / "a.bin", L2C, {**t, "rms_final": bad}, tok)
    assert list(tmp_path.iterdir()) == []


def test_error_meta_absurd_layers_and_int_tensor(tmp_path, sp_model, capsys):
    p = {"dim": 64, "n_layers": 10**9, "n_heads": 8, "vocab_size": 32000, "multiple_of": 32,
         "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}
    w = meta_weights({**p, "n_layers": 2}, 32000, seed=0)
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(p))
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    torch.save(w, folder / "consolidated.00.pth")
    out = str(tmp_path / "m.bin")
    _fails_cleanly(capsys, [str(folder), out], "missing tensor layers.2.attention_norm.weight")
    (folder / "params.json").write_text(json.dumps({**p, "n_layers": 2}))
    w["layers.0.feed_forward.w3.weight"] = w["layers.0.feed_forward.w3.weight"].to(torch.int32)
    torch.save(w, folder / "consolidated.00.pth")
    _fails_cleanly(capsys, [str(folder), out], "layers.0.feed_forward.w3.weight", "int32")
    for bad, word in (({"norm_eps": "x"}, "norm_eps"), ({"vocab_size": "big"}, "vocab_size"),
                      ({"ffn_dim_multiplier": "x"}, "ffn_dim_multiplier"), ({"rope_theta": [1]}, "rope_theta")):
        (folder / "params.json").write_text(json.dumps({**p, "n_layers": 2, **bad}))
        _fails_cleanly(capsys, [str(folder), out], "params.json", word)


def test_error_out_is_a_source_file(hf_base, tmp_path, capsys):
    """OUT must not replace what the export reads: a file of the SRC folder, or the --tokenizer."""
    src = hf_variant(hf_base, tmp_path / "hf")
    before = (hf_base / "model.safetensors").read_bytes()
    for out in (src / "model.safetensors", hf_base / "config.json"):
        assert "is one of the source's files" in _run_main(capsys, [str(src), str(out)])
    assert (hf_base / "model.safetensors").read_bytes() == before
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes((hf_base / "tokenizer.json").read_bytes())
    assert "is the tokenizer" in _run_main(capsys, [str(src), str(tok), "--tokenizer", str(tok)])
    assert tok.read_bytes() == (hf_base / "tokenizer.json").read_bytes()
    export_model(src, src / "kvc.bin")  # a new file in the folder is fine


def test_error_out_is_a_folder(hf_base, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    assert "is a folder" in _run_main(capsys, [str(hf_base), str(tmp_path / "dir")])
    assert list((tmp_path / "dir").iterdir()) == []


def test_error_seq_len_does_not_fit_header(hf_base, tmp_path, capsys):
    _fails_cleanly(capsys, [str(hf_base), str(tmp_path / "m.bin"), "--seq-len", str(2**31)], "--seq-len")


def test_error_kvc_source_with_bad_header(tmp_path, capsys):
    """A kvc file as SRC whose header makes no sense: one line, no ZeroDivisionError or numpy message."""
    from helpers import write_random_model
    from kvc.format import HEADER, HEADER_FIELDS

    write_random_model(tmp_path / "m.bin")
    data = bytearray((tmp_path / "m.bin").read_bytes())
    fields = [n for n, _ in HEADER_FIELDS]
    for field, value, word in (("config.n_heads", 0, "n_heads"), ("config.n_layers", 1000, "weights"),
                               ("config.dim", -64, "dim"), ("types.wq", 7, "weight type"),
                               ("types.group_size", 16, "group_size")):
        values = list(HEADER.unpack_from(data, 0))
        values[fields.index(field)] = value
        bad = tmp_path / f"bad-{field}.bin"
        bad.write_bytes(HEADER.pack(*values) + bytes(data[HEADER.size:]))
        err = _fails_cleanly(capsys, [str(bad), str(tmp_path / "o.bin")], word)
        assert "division" not in err and "buffer" not in err, err


def test_exported_file_mode_follows_umask(hf_base, tmp_path):
    old = os.umask(0o027)
    try:
        export_model(hf_base, tmp_path / "m.bin")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.bin").stat().st_mode) == 0o640
