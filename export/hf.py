"""Hugging Face Llama folders: config.json + *.safetensors or pytorch_model*.bin."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvc.format import Config

from .common import (
    ExportError, Slot, SourceModel, check_float, permute_hf_rope, positive_int, positive_number, read_json, read_tensors,
    read_text, token_id,
)
from .tokenizers import read_hf_tokenizer_json, read_sentencepiece

ARCHITECTURES = {"LlamaForCausalLM", "LLaMAForCausalLM"}


def is_hf_folder(path: Path) -> bool:
    """A folder with a config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def _first_id(value, default: int, what: str) -> int:
    """A token id from config.json, where it may be null (the default applies) or a list (the first counts)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else token_id(value, f"config.json: {what}")


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
    return positive_number(10000.0 if theta is None else theta, "config.json: rope_theta")


def _check_architecture(cfg: dict) -> None:
    """ExportError unless config.json describes a Llama model kvc can run."""
    archs = cfg.get("architectures")
    if archs:
        if not isinstance(archs, list):
            raise ExportError(f"config.json: architectures is {archs!r}, expected a list")
        if not any(a in ARCHITECTURES for a in archs if isinstance(a, str)):
            raise ExportError(f"unsupported architecture {archs[0]}")
    elif cfg.get("model_type") != "llama":  # no architectures: a bare LlamaConfig still says model_type
        raise ExportError(f"unsupported architecture {cfg.get('model_type', 'unknown')}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ExportError(f"config.json: {flag}=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"config.json: unsupported activation {act!r}")


def read_config(folder: Path) -> Config:
    """kvc Config from config.json (without the tokenizer)."""
    cfg = read_json(folder / "config.json")
    _check_architecture(cfg)

    def dim(key: str, value=None) -> int:
        return positive_int(cfg[key] if value is None else value, f"config.json: {key}")

    try:
        n_heads = dim("num_attention_heads")
        n_kv = dim("num_key_value_heads", cfg.get("num_key_value_heads") or n_heads)
        head_dim = dim("head_dim", cfg.get("head_dim") or dim("hidden_size") // n_heads)
        c = Config(
            dim=dim("hidden_size"),
            hidden_dim=dim("intermediate_size"),
            n_layers=dim("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=dim("vocab_size"),
            seq_len=dim("max_position_embeddings", cfg.get("max_position_embeddings", 2048)),
            head_dim=head_dim,
            rope_theta=rope_theta(cfg),
            norm_eps=positive_number(cfg.get("rms_norm_eps", 1e-6), "config.json: rms_norm_eps"),
            shared_classifier=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=_first_id(cfg.get("bos_token_id"), 1, "bos_token_id"),
            eos_id=_first_id(cfg.get("eos_token_id"), 2, "eos_token_id"),
        )
    except KeyError as e:
        raise ExportError(f"config.json: missing {e.args[0]}") from None
    if n_heads % n_kv:
        raise ExportError(f"config.json: {n_heads} heads is not a multiple of {n_kv} kv heads")
    if head_dim % 2:
        raise ExportError(f"config.json: head_dim {head_dim} is odd")
    return c


def _safetensors_is_float(dtype: str) -> bool:
    """Whether a safetensors dtype name (F32, BF16, F8_E4M3, I32, BOOL...) is a float type."""
    return dtype.startswith("F") or dtype == "BF16"


class _Weights:
    """Lazy access to the folder's tensors by HF name: shapes and dtypes up front, data as float32 on demand."""

    def __init__(self, folder: Path):
        self.files: dict[str, Path] = {}
        self.info: dict[str, tuple[tuple[int, ...], str, bool]] = {}  # name -> shape, dtype, is float
        self.loaded: dict[Path, dict] = {}
        st = sorted(folder.glob("*.safetensors"))
        pt = sorted(folder.glob("pytorch_model*.bin"))
        if st:
            for f in st:
                self._index_safetensors(f)
        elif pt:
            for f in pt:
                for k, v in self._load_pt(f).items():
                    self.files[k] = f
                    self.info[k] = _torch_info(v)
        else:
            raise ExportError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")

    def _index_safetensors(self, f: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    dtype = sl.get_dtype()
                    self.files[k] = f
                    self.info[k] = (tuple(sl.get_shape()), dtype, _safetensors_is_float(dtype))
        except Exception as e:
            raise ExportError(f"{f}: not a valid safetensors file ({e})") from None

    def _load_pt(self, f: Path) -> dict:
        if f not in self.loaded:
            import torch

            try:
                self.loaded.clear()  # one shard in memory at a time
                self.loaded[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ExportError(f"{f}: cannot load ({e})") from None
            if not isinstance(self.loaded[f], dict):
                raise ExportError(f"{f}: not a state dict of tensors")
        return self.loaded[f]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`; ExportError if it is missing or not a float tensor."""
        if name not in self.info:
            raise ExportError(f"missing tensor {name}")
        shape, dtype, is_float = self.info[name]
        check_float(name, dtype, is_float)
        return shape

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 (shape() has vetted it)."""
        self.shape(name)
        f = self.files[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name)
        else:
            t = self._load_pt(f)[name]
        return t.float().numpy()


def _torch_info(value) -> tuple[tuple[int, ...], str, bool]:
    """Shape, dtype name and whether it is a float tensor, for a value of a torch state dict."""
    import torch

    if not isinstance(value, torch.Tensor):
        return (), type(value).__name__, False
    return tuple(value.shape), str(value.dtype).removeprefix("torch."), value.is_floating_point()


TOP_TENSORS = {"tok_embeddings": "model.embed_tokens.weight", "rms_final": "model.norm.weight",
               "wcls": "lm_head.weight"}
LAYER_TENSORS = {
    "rms_att": "model.layers.{layer}.input_layernorm.weight",
    "wq": "model.layers.{layer}.self_attn.q_proj.weight",
    "wk": "model.layers.{layer}.self_attn.k_proj.weight",
    "wv": "model.layers.{layer}.self_attn.v_proj.weight",
    "wo": "model.layers.{layer}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{layer}.post_attention_layernorm.weight",
    "w1": "model.layers.{layer}.mlp.gate_proj.weight",
    "w2": "model.layers.{layer}.mlp.down_proj.weight",
    "w3": "model.layers.{layer}.mlp.up_proj.weight",
}


def read_hf(folder: Path, with_tokenizer: bool = True) -> SourceModel:
    """Read a Hugging Face Llama folder; q/k rows are permuted to the interleaved RoPE layout.

    The folder's tokenizer.model or tokenizer.json is read unless `with_tokenizer` is False.
    """
    c = read_config(folder)
    w = _Weights(folder)
    if c.shared_classifier is False and "lm_head.weight" not in w:
        c.shared_classifier = True  # no lm_head: the embeddings are the classifier

    def load(s: Slot) -> np.ndarray:
        a = w.get(s.source)
        if s.name == "wq":
            return permute_hf_rope(a, c.n_heads, c.head_dim)
        if s.name == "wk":
            return permute_hf_rope(a, c.n_kv_heads, c.head_dim)
        return a

    t = read_tensors(c, TOP_TENSORS, LAYER_TENSORS, lambda s: w.shape(s.source), load)
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
    return read_json(f) if f.is_file() else {}


def _chat_template(folder: Path) -> str | None:
    """The chat template text from chat_template.jinja or tokenizer_config.json, if any."""
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja")
    tpl = _tokenizer_config(folder).get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in tpl if isinstance(d, dict) and isinstance(d.get("name"), str)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None
