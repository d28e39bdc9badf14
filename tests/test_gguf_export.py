"""GGUF -> kvc: the real SmolLM2-135M-Instruct file, and small random GGUF files written here."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers

from export import export_model
from export.__main__ import main
from export.gguf import hf_tokenizer_json
from export.tokenizers import bytes_to_unicode
from kvc.format import (
    BYTE, CHAT_CHATML, CHAT_NONE, CONTROL, F32, FLAG_ADD_BOS, FLAG_ADD_DUMMY_PREFIX, FLAG_BYTE_FALLBACK, MATRICES,
    NORMAL, PRETOK_SMOLLM, Q8_0, TOK_BYTE_BPE, TOK_SENTENCEPIECE, ChatTemplate, Checkpoint, Config, as_float, read_model,
    read_types, tensor_shapes,
)
from kvc import format as fmt
from kvc.reference import Llama

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CORPUS = [
    "Hello world 12345",
    "The capital of France is",
    "  two spaces,   three, \t tab\n\nnewlines\r\n",
    "def f(x):\n    return x**2  # code 3.14159",
    "日本語のテキスト and CJK 中文",
    "emoji 🤗🚀 and accents: café naïve",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="session")
def smol_hf_tokenizer(smollm2_gguf) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(hf_tokenizer_json(smollm2_gguf))


def test_smollm2_config_tokenizer_template(smollm2_bin):
    ck = read_model(smollm2_bin)
    c = ck.config
    assert (c.n_layers, c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert (c.rope_theta, c.seq_len, c.vocab_size, c.shared_classifier) == (100000.0, 8192, 49152, True)
    assert np.float32(c.norm_eps) == np.float32(1e-5)
    assert (c.bos_id, c.eos_id) == (1, 2)
    assert sum(int(np.prod(s)) for _, s in tensor_shapes(c)) == 134_515_008
    tok = ck.tokenizer
    assert (tok.kind, tok.pretokenizer, tok.flags) == (TOK_BYTE_BPE, PRETOK_SMOLLM, 0)
    assert len(tok.pieces) == 49152 and len(tok.merges) == 48900
    assert tok.pieces[:3] == [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    assert tok.types[:17] == [CONTROL] * 17 and set(tok.types[17:]) == {NORMAL}
    assert b" Paris" in tok.pieces and b"\n" in tok.pieces  # raw bytes, not GPT-2's "ĠParis" / "Ċ"
    assert tok.pieces[4649] == b" France" and tok.pieces[198] == b"\n"  # GGUF: "ĠFrance", "Ċ"
    t = ck.template
    assert (t.style, t.end_of_turn, t.default_system) == (CHAT_CHATML, 2, SMOL_SYSTEM)
    assert "<|im_start|>" in t.jinja


def test_smollm2_greedy_paris(smollm2_bin, smol_hf_tokenizer):
    ids = smol_hf_tokenizer.encode("The capital of France is").ids
    assert ids == [504, 3575, 282, 4649, 314]
    out = Llama.load(smollm2_bin).greedy(ids, 2)
    assert smol_hf_tokenizer.decode(out).startswith(" Paris"), smol_hf_tokenizer.decode(out)


def test_hf_tokenizer_json_matches_kvc_pieces(smollm2_bin, smol_hf_tokenizer):
    """The tokenizer.json built from GGUF metadata is SmolLM2's: digits alone, specials whole,
    and every id it produces spells the text in kvc's raw-byte pieces."""
    tok = read_model(smollm2_bin).tokenizer
    hf = smol_hf_tokenizer
    enc = hf.encode("Hello world 12345")
    assert enc.tokens == ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5"]
    assert hf.encode("<|im_start|>user\nhi<|im_end|>").ids[0::4] == [1, 2]
    spec = json.loads(hf.to_str())
    assert [t["content"] for t in spec["added_tokens"][:3]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(t["special"] for t in spec["added_tokens"])
    for text in CORPUS:
        ids = hf.encode(text).ids
        assert b"".join(tok.pieces[i] for i in ids) == text.encode(), text
        assert hf.decode(ids, skip_special_tokens=False) == text
    # merges are the same pairs, in the same rank order
    merges = spec["model"]["merges"]
    vocab = spec["model"]["vocab"]
    assert len(merges) == 48900
    assert [(vocab[a], vocab[b]) for a, b in merges[:1000]] == tok.merges[:1000]


# ----------------------------------------------------------------------------------------------
# small random GGUF files

SMALL = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=0, seq_len=64,
               head_dim=16, rope_theta=1e5)
GGUF_NAMES = {"rms_att": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "rms_ffn": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}


def small_vocab(kind: str) -> tuple[list[str], list[int], list[str], list[float]]:
    """tokens, types, merges (gpt2) or scores (llama)."""
    if kind == "gpt2":
        b2u = bytes_to_unicode()
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
        types = [CONTROL] * 3 + [NORMAL] * 259
        return tokens, types, ["Ġ t", "h e", "Ġt he"], []
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁t", "he", "▁the"]
    types = [2, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * 3
    return tokens, types, [], [0.0] * 259 + [-1.0, -2.0, -3.0]


def write_small_gguf(path: Path, kind: str, tied: bool, *, arch: str = "llama", drop: str | None = None, seed: int = 0,
                     pre: str = "smollm", add_bos: bool | None = None, meta: dict | None = None,
                     replace: dict[str, np.ndarray] | None = None,
                     layer_types: tuple[str, ...] = ("f32", "f16")) -> tuple[Config, dict[str, np.ndarray]]:
    """A random llama GGUF (f32 norms, Q8_0 token_embd, layer l's matrices of layer_types[l]: f32,
    f16 or a GGML block type gguf quantizes); returns the tensors it holds, as dequantized float32
    in kvc names. `pre` is the gpt2 pre-tokenizer; `add_bos` None leaves tokenizer.ggml.add_bos_token
    out; `meta` ({key: (value, GGUFValueType)}) sets metadata last, over what was there; `replace`
    ({GGUF name: array}) stores those arrays as they are."""
    tokens, types, merges, scores = small_vocab(kind)
    c = Config(**{**SMALL.__dict__, "vocab_size": len(tokens), "shared_classifier": tied})
    rng = np.random.default_rng(seed)
    t = {n: (1 + 0.1 * rng.standard_normal(s) if n.startswith("rms") else 0.2 * rng.standard_normal(s)).astype(np.float32)
         for n, s in tensor_shapes(c)}
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    else:
        w.add_token_scores(scores)
        w.add_add_space_prefix(True)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)

    for key, (value, vtype) in (meta or {}).items():
        w.add_key_value(key, value, vtype)

    def add(name: str, a: np.ndarray, quant: str) -> np.ndarray:
        if name == drop:
            return a
        if name in (replace or {}):
            w.add_tensor(name, replace[name])
            return a
        if quant == "f16":
            w.add_tensor(name, a.astype(np.float16))
            return a.astype(np.float16).astype(np.float32)
        if quant == "f32":
            w.add_tensor(name, a)
            return a
        gtype = gguf.GGMLQuantizationType[quant.upper()]
        q = gguf.quants.quantize(a, gtype)
        w.add_tensor(name, q, raw_dtype=gtype)
        return gguf.quants.dequantize(q, gtype).reshape(a.shape)

    t["tok_embeddings"] = add("token_embd.weight", t["tok_embeddings"], "q8_0")
    t["rms_final"] = add("output_norm.weight", t["rms_final"], "f32")
    if not tied:
        t["wcls"] = add("output.weight", t["wcls"], "f16")
    for kname, gname in GGUF_NAMES.items():
        for l in range(c.n_layers):
            quant = "f32" if kname.startswith("rms") else layer_types[l]
            t[kname][l] = add(f"blk.{l}.{gname}.weight", t[kname][l], quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return c, t


@pytest.mark.parametrize("layer_types,kept", [(("q4_0", "q4_0"), fmt.Q4_0), (("q4_1", "q4_1"), fmt.Q4_1),
                                              (("q4_1", "q5_0"), None), (("q5_0", "q5_0"), None)])
def test_gguf_block_types(tmp_path, capsys, layer_types, kept):
    """Q4_0 and Q4_1 matrices export as they are stored, block for block (their values unchanged);
    a type kvc has no kernel for (Q5_0 here), or types that differ from layer to layer, become q8_0
    in groups of 32, which a warning names; --dtype converts everything."""
    src, out = tmp_path / "m.gguf", tmp_path / "m.bin"
    c, t = write_small_gguf(src, "gpt2", True, layer_types=layer_types)
    assert main([str(src), str(out)]) == 0
    err = capsys.readouterr().err
    ck = read_model(out)
    types = read_types(out)
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        if kept is not None:
            assert types[name] == kept and np.array_equal(as_float(ck.tensors[name]), t[name]), name
        else:
            assert types[name] == Q8_0 and ck.tensors[name].group_size == 32, name
            assert name in err and "q8_0" in err
    if kept is not None:
        assert "warning" not in err
    assert main([str(src), str(out), "--dtype", "q4_1"]) == 0
    assert set(read_types(out).values()) == {fmt.Q4_1, 0}  # group_size 0: no q8_0 left


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("gpt2", False), ("llama", False)])
def test_small_gguf(tmp_path, kind, tied):
    src, out = tmp_path / "m.gguf", tmp_path / "m.bin"
    c, t = write_small_gguf(src, kind, tied)
    export_model(src, out)
    ck = read_model(out)
    assert (ck.config.n_kv_heads, ck.config.head_dim, ck.config.rope_theta, ck.config.shared_classifier) == (2, 16, 1e5, tied)
    for name, _ in tensor_shapes(c):
        assert np.array_equal(as_float(ck.tensors[name]), t[name]), name  # no permutation: GGUF is interleaved already
    # Q8_0 kept as stored (its blocks, not requantized), F16 and F32 as f32
    assert read_types(out) == {"group_size": 32, **dict.fromkeys(MATRICES, F32), "tok_embeddings": Q8_0,
                               **({"wcls": Q8_0} if tied else {})}
    tokens = [0, 5, 17, 3, 99, 42, 7, 250, 1, 64]
    d = np.abs(Llama(ck).forward_full(tokens) - Llama(Checkpoint(c, t, None, ChatTemplate())).forward_full(tokens)).max()
    assert d == 0.0
    tok = ck.tokenizer
    if kind == "gpt2":
        assert tok.flags == 0  # no tokenizer.ggml.add_bos_token: llama.cpp's default for smollm is no BOS
        assert tok.kind == TOK_BYTE_BPE and tok.pieces[3 + 256:] == [b" t", b"he", b" the"]
        assert tok.merges == [(3 + 32, 3 + ord("t")), (3 + ord("h"), 3 + ord("e")), (259, 260)]
        assert (ck.template.style, ck.template.end_of_turn, ck.template.default_system) == (CHAT_CHATML, 2, "")
    else:
        assert tok.kind == TOK_SENTENCEPIECE and tok.flags == FLAG_ADD_DUMMY_PREFIX | FLAG_BYTE_FALLBACK | FLAG_ADD_BOS
        assert tok.pieces[-1] == "▁the".encode() and tok.scores[-3:] == [-1.0, -2.0, -3.0]
        assert tok.types[:4] == [2, CONTROL, CONTROL, BYTE] and tok.unk_id == 0
        assert ck.template.style == CHAT_NONE


@pytest.mark.parametrize("kind,pre,add_bos,want", [
    ("gpt2", "smollm", None, False),  # llama.cpp: byte-level BPE adds no BOS by default...
    ("gpt2", "gpt-2", None, False),
    ("gpt2", "llama-bpe", None, True),  # ...except the Llama 3 pre-tokenizers (llama-vocab.cpp)
    ("gpt2", "llama3", None, True),
    ("gpt2", "llama-bpe", False, False),  # the key, when present, decides
    ("gpt2", "smollm", True, True),
    ("llama", "", None, True),  # sentencepiece adds BOS by default
    ("llama", "", False, False),
])
def test_gguf_add_bos_default(tmp_path, kind, pre, add_bos, want):
    """Without tokenizer.ggml.add_bos_token, kvc adds BOS to prompts exactly when llama.cpp would."""
    src, out = tmp_path / "m.gguf", tmp_path / "m.bin"
    write_small_gguf(src, kind, True, pre=pre, add_bos=add_bos)
    export_model(src, out)
    assert bool(read_model(out).tokenizer.flags & FLAG_ADD_BOS) == want


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_gguf_errors(tmp_path, capsys):
    out = tmp_path / "out" / "m.bin"
    out.parent.mkdir()
    write_small_gguf(tmp_path / "gpt.gguf", "gpt2", True, arch="gpt2")
    assert _fails(capsys, [str(tmp_path / "gpt.gguf"), str(out)]) == "error: unsupported architecture gpt2"
    write_small_gguf(tmp_path / "miss.gguf", "gpt2", True, drop="blk.1.ffn_up.weight")
    assert _fails(capsys, [str(tmp_path / "miss.gguf"), str(out)]) == "error: missing tensor blk.1.ffn_up.weight"
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# hardening: malformed metadata, non-float and non-finite tensors, OUT vs SRC

V = gguf.GGUFValueType
N_GPT2 = len(small_vocab("gpt2")[0])
META_CASES = {
    "arch_not_utf8": ({"general.architecture": (b"ll\xffma", V.STRING)}, "general.architecture is not valid UTF-8"),
    "dim_string": ({"llama.embedding_length": ("64", V.STRING)}, "llama.embedding_length"),
    "dim_1e9": ({"llama.embedding_length": (10**9, V.UINT32)}, "token_embd.weight"),
    "layers_1e9": ({"llama.block_count": (10**9, V.UINT32)}, "missing tensor blk.2.attn_norm.weight"),
    "theta_string": ({"llama.rope.freq_base": ("abc", V.STRING)}, "llama.rope.freq_base"),
    "theta_negative": ({"llama.rope.freq_base": (-1.0, V.FLOAT32)}, "llama.rope.freq_base"),
    "eps_string": ({"llama.attention.layer_norm_rms_epsilon": ("x", V.STRING)}, "layer_norm_rms_epsilon"),
    "scaling_int": ({"llama.rope.scaling.type": (5, V.UINT32)}, "rope.scaling.type"),
    "tokens_ints": ({"tokenizer.ggml.tokens": ([1, 2, 3], V.ARRAY)}, "tokenizer.ggml.tokens"),
    "tokens_not_utf8": ({"tokenizer.ggml.tokens": ([b"a", b"\xff"] * (N_GPT2 // 2), V.ARRAY)}, "not valid UTF-8"),
    "types_strings": ({"tokenizer.ggml.token_type": (["a"] * N_GPT2, V.ARRAY)}, "tokenizer.ggml.token_type"),
    "merges_ints": ({"tokenizer.ggml.merges": ([1, 2], V.ARRAY)}, "tokenizer.ggml.merges"),
    "bos_string": ({"tokenizer.ggml.bos_token_id": ("x", V.STRING)}, "tokenizer.ggml.bos_token_id"),
    "unk_outside": ({"tokenizer.ggml.unknown_token_id": (10**6, V.UINT32)}, "tokenizer.ggml.unknown_token_id"),
    "template_int": ({"tokenizer.chat_template": (5, V.UINT32)}, "tokenizer.chat_template"),
    "add_bos_string": ({"tokenizer.ggml.add_bos_token": ("yes", V.STRING)}, "tokenizer.ggml.add_bos_token"),
    "model_int": ({"tokenizer.ggml.model": (7, V.UINT32)}, "tokenizer.ggml.model"),
    "pre_int": ({"tokenizer.ggml.pre": (3, V.UINT32)}, "tokenizer.ggml.pre"),
}


@pytest.mark.parametrize("case", META_CASES)
def test_gguf_malformed_metadata(tmp_path, capsys, case):
    """Each wrong type or absurd value in GGUF metadata is one line naming the key; nothing written."""
    meta, word = META_CASES[case]
    write_small_gguf(tmp_path / "m.gguf", "gpt2", True, meta=meta)
    (tmp_path / "out").mkdir()
    err = _fails(capsys, [str(tmp_path / "m.gguf"), str(tmp_path / "out" / "m.bin")])
    assert word in err, err
    assert "codec" not in err and list((tmp_path / "out").iterdir()) == []


def test_gguf_sentencepiece_scores_wrong_type(tmp_path, capsys):
    n = len(small_vocab("llama")[0])
    write_small_gguf(tmp_path / "m.gguf", "llama", True, meta={"tokenizer.ggml.scores": (["x"] * n, V.ARRAY)})
    assert "tokenizer.ggml.scores" in _fails(capsys, [str(tmp_path / "m.gguf"), str(tmp_path / "m.bin")])


def test_gguf_int_tensor(tmp_path, capsys):
    write_small_gguf(tmp_path / "m.gguf", "gpt2", True, replace={"blk.0.attn_q.weight": np.ones((128, 64), np.int32)})
    err = _fails(capsys, [str(tmp_path / "m.gguf"), str(tmp_path / "m.bin")])
    assert err == "error: tensor blk.0.attn_q.weight has dtype I32, expected a float type"


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_gguf_nonfinite_tensor(tmp_path, capsys, value):
    a = np.ones((64, 96), np.float32)
    a[10, 20] = value
    write_small_gguf(tmp_path / "m.gguf", "gpt2", True, replace={"blk.1.ffn_down.weight": a})
    err = _fails(capsys, [str(tmp_path / "m.gguf"), str(tmp_path / "m.bin")])
    assert err == "error: tensor blk.1.ffn_down.weight has NaN or Inf values"
    assert not (tmp_path / "m.bin").exists()


def test_gguf_out_is_src(tmp_path, capsys):
    """OUT naming the GGUF itself, directly or through a symlink either way, is refused; the GGUF stays."""
    src = tmp_path / "m.gguf"
    write_small_gguf(src, "gpt2", True)
    before = src.read_bytes()
    (tmp_path / "link.bin").symlink_to(src)
    (tmp_path / "link.gguf").symlink_to(src)
    cases = [(src, src), (src, tmp_path / "link.bin"), (tmp_path / "link.gguf", src), (src, tmp_path / "." / "m.gguf")]
    for s, o in cases:
        assert "is the source" in _fails(capsys, [str(s), str(o)])
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "link.gguf", "m.gguf"]
