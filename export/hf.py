"""Hugging Face Llama folders: config.json + *.safetensors or pytorch_model*.bin."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvc.format import Config

from .common import ExportError, SourceModel, check_shape, empty_tensors, permute_hf_rope, positive_int, progress_bar
from .tokenizers import read_hf_tokenizer_json, read_sentencepiece

ARCHITECTURES = {"LlamaForCausalLM", "LLaMAForCausalLM"}


def is_hf_folder(path: Path) -> bool:
    """A folder with a config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def _first_id(value, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def rope_theta(cfg: dict) -> float:
    """RoPE theta from `rope_theta` or `rope_parameters`; ExportError for scaling kvc lacks."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    for spec in (params, scaling):
        if spec:
            if not isinstance(spec, dict):
                raise ExportError(f"config.json: unsupported rope parameters {spec!r}")
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                raise ExportError(f"config.json: unsupported rope scaling type {kind!r}")
            if "rope_theta" in spec:
                theta = spec["rope_theta"]
    return float(10000.0 if theta is None else theta)


def read_config(folder: Path) -> Config:
    """kvc Config from config.json (without the tokenizer)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ExportError(f"{folder / 'config.json'}: invalid JSON ({e})") from None
    archs = cfg.get("architectures")
    if archs:
        if not any(a in ARCHITECTURES for a in archs):
            raise ExportError(f"unsupported architecture {archs[0]}")
    elif cfg.get("model_type") != "llama":  # no architectures: a bare LlamaConfig still says model_type
        raise ExportError(f"unsupported architecture {cfg.get('model_type', 'unknown')}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ExportError(f"config.json: {flag}=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"config.json: unsupported activation {act!r}")
    try:
        dim = positive_int(cfg["hidden_size"], "hidden_size")
        n_heads = positive_int(cfg["num_attention_heads"], "num_attention_heads")
        n_kv = positive_int(cfg.get("num_key_value_heads") or n_heads, "num_key_value_heads")
        head_dim = positive_int(cfg.get("head_dim") or dim // n_heads, "head_dim")
        c = Config(
            dim=dim,
            hidden_dim=positive_int(cfg["intermediate_size"], "intermediate_size"),
            n_layers=positive_int(cfg["num_hidden_layers"], "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=positive_int(cfg["vocab_size"], "vocab_size"),
            seq_len=positive_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings"),
            head_dim=head_dim,
            rope_theta=rope_theta(cfg),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            shared_classifier=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=_first_id(cfg.get("bos_token_id"), 1),
            eos_id=_first_id(cfg.get("eos_token_id"), 2),
        )
    except KeyError as e:
        raise ExportError(f"config.json: missing {e.args[0]}") from None
    if n_heads % n_kv:
        raise ExportError(f"config.json: {n_heads} heads is not a multiple of {n_kv} kv heads")
    if head_dim % 2:
        raise ExportError(f"config.json: head_dim {head_dim} is odd")
    return c


class _Weights:
    """Lazy access to the folder's tensors by HF name, as float32 numpy arrays."""

    def __init__(self, folder: Path):
        self.files: dict[str, Path] = {}
        self.loaded: dict[Path, dict] = {}
        st = sorted(folder.glob("*.safetensors"))
        pt = sorted(folder.glob("pytorch_model*.bin"))
        if st:
            from safetensors import safe_open

            for f in st:
                try:
                    with safe_open(str(f), framework="pt") as h:
                        for k in h.keys():
                            self.files[k] = f
                except Exception as e:
                    raise ExportError(f"{f}: not a valid safetensors file ({e})") from None
        elif pt:
            for f in pt:
                self.files.update({k: f for k in self._load_pt(f)})
        else:
            raise ExportError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")

    def _load_pt(self, f: Path) -> dict:
        if f not in self.loaded:
            import torch

            try:
                self.loaded.clear()  # one shard in memory at a time
                self.loaded[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ExportError(f"{f}: cannot load ({e})") from None
        return self.loaded[f]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ExportError(f"missing tensor {name}")
        f = self.files[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name)
        else:
            t = self._load_pt(f)[name]
        return t.float().numpy()


def read_hf(folder: Path, with_tokenizer: bool = True) -> SourceModel:
    """Read a Hugging Face Llama folder; q/k rows are permuted to the interleaved RoPE layout.

    The folder's tokenizer.model or tokenizer.json is read unless `with_tokenizer` is False.
    """
    c = read_config(folder)
    w = _Weights(folder)
    if c.shared_classifier is False and "lm_head.weight" not in w:
        c.shared_classifier = True  # no lm_head: the embeddings are the classifier
    t = empty_tensors(c)
    hd = c.head_dim
    per_layer = [
        ("input_layernorm", "rms_att", (c.dim,)),
        ("self_attn.q_proj", "wq", (c.q_dim, c.dim)),
        ("self_attn.k_proj", "wk", (c.kv_dim, c.dim)),
        ("self_attn.v_proj", "wv", (c.kv_dim, c.dim)),
        ("self_attn.o_proj", "wo", (c.dim, c.q_dim)),
        ("post_attention_layernorm", "rms_ffn", (c.dim,)),
        ("mlp.gate_proj", "w1", (c.hidden_dim, c.dim)),
        ("mlp.down_proj", "w2", (c.dim, c.hidden_dim)),
        ("mlp.up_proj", "w3", (c.hidden_dim, c.dim)),
    ]
    top = [("model.embed_tokens.weight", "tok_embeddings", (c.vocab_size, c.dim)),
           ("model.norm.weight", "rms_final", (c.dim,))]
    if not c.shared_classifier:
        top.append(("lm_head.weight", "wcls", (c.vocab_size, c.dim)))
    with progress_bar(len(top) + c.n_layers * len(per_layer), "reading") as bar:
        for hf_name, name, shape in top:
            a = w.get(hf_name)
            check_shape(hf_name, a, shape)
            t[name][...] = a
            bar.update()
        for layer in range(c.n_layers):
            for hf_part, name, shape in per_layer:
                hf_name = f"model.layers.{layer}.{hf_part}.weight"
                a = w.get(hf_name)
                check_shape(hf_name, a, shape)
                if name == "wq":
                    a = permute_hf_rope(a, c.n_heads, hd)
                elif name == "wk":
                    a = permute_hf_rope(a, c.n_kv_heads, hd)
                t[name][layer] = a
                bar.update()
    tok = _folder_tokenizer(folder) if with_tokenizer else None
    return SourceModel(c, t, tok, jinja=_chat_template(folder))


def _folder_tokenizer(folder: Path):
    """tokenizer.model (preferred: it has real scores) or tokenizer.json; BOS per tokenizer_config.json."""
    add_bos = _tokenizer_config(folder).get("add_bos_token")
    if (folder / "tokenizer.model").is_file():
        return read_sentencepiece(folder / "tokenizer.model", True if add_bos is None else bool(add_bos))
    if (folder / "tokenizer.json").is_file():
        return read_hf_tokenizer_json(folder / "tokenizer.json", None if add_bos is None else bool(add_bos))
    return None


def _tokenizer_config(folder: Path) -> dict:
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        raise ExportError(f"{f}: invalid JSON") from None
    return cfg if isinstance(cfg, dict) else {}


def _chat_template(folder: Path) -> str | None:
    """The chat template text from chat_template.jinja or tokenizer_config.json, if any."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = _tokenizer_config(folder).get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in tpl if isinstance(d, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None
