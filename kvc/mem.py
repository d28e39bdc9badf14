"""python -m kvc.mem SOURCE: what the KV cache costs in bytes, term by term.

SOURCE is a kvc `.bin` (or llama2.c) checkpoint (only its header is read), a GGUF file (its
metadata), an HF `config.json` (or the folder holding one), or a preset name; or give the shape
with --layers/--kv-heads/--head-dim [--heads]. The cache holds, per layer and position, a key row
and a value row of kv_heads x head_dim values each, in the types -ctk/-ctv name (f32 by default,
as in the engine):

    bytes = 2 x layers x kv_heads x head_dim x seq_len x batch x bytes per value

f32 is 4 bytes a value, f16/bf16 2, q8_0 34 per 32 values and q4_0 and iq4_nl 18 per 32 (a group of
32 values shares one fp16 scale). An iq4_nl cache also keeps position 0 as q8_0 in a slot of its own
(per layer, and per keys and values that are iq4_nl): a constant added per sequence. For a `.bin` the
sizes equal kvc.Model(...).memory() exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import format as fmt

# cache type -> (bytes, values): a block of `values` values takes `bytes` bytes (run.c's CACHE_TYPES)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q4_0": (18, 32),
    "iq4_nl": (18, 32),
}
SINK_TYPES = {"iq4_nl": "q8_0"}  # a type that stores position 0 apart, and how (run.c's CACHE_SINK_TYPE)


@dataclass(frozen=True)
class Shape:
    """What the cache's size depends on, and what else is known about the model."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_heads: int | None = None  # None: unknown, so no GQA comparison
    context: int | None = None  # the model's own context length (the default seq_len)
    weights_bytes: int | None = None  # None: unknown
    source: str = "explicit shape"
    checkpoint: Path | None = None  # a checkpoint kvc.Model can open (for the scratch bytes)
    weights_note: str = "the file"  # what weights_bytes counts


# published shapes: (layers, heads, kv heads, head_dim, context)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "llama-2-7b": (32, 32, 32, 128, 4096),
    "llama-2-70b": (80, 64, 8, 128, 4096),
    "llama-3-8b": (32, 32, 8, 128, 8192),
    "llama-3-70b": (80, 64, 8, 128, 8192),
    "mistral-7b": (32, 32, 8, 128, 32768),
    "smollm2-135m": (30, 9, 3, 64, 8192),
}


class MemError(ValueError):
    """Bad input: reported as one `error:` line."""


def positive(value: object, what: str) -> int:
    """`value` as a positive int, or MemError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise MemError(f"{what} is {shown}, expected a positive integer")
    return value


def per_value(cache_type: str) -> str:
    """Bytes per value of a cache type as written in the formula: "4", "2", "34/32", "18/32"."""
    size, values = CACHE_TYPES[cache_type]
    return str(size) if values == 1 else f"{size}/{values}"


def row_bytes(cache_type: str, n: int) -> int:
    """Bytes of n values (a multiple of the type's block) stored as cache_type."""
    size, values = CACHE_TYPES[cache_type]
    return n // values * size


def check_type(cache_type: str, head_dim: int) -> None:
    """MemError unless cache_type is known and its blocks divide head_dim (the engine's rule)."""
    if cache_type not in CACHE_TYPES:
        raise MemError(f"unknown cache type {cache_type!r} ({', '.join(CACHE_TYPES)})")
    values = CACHE_TYPES[cache_type][1]
    if head_dim % values:
        raise MemError(f"cache type {cache_type} stores groups of {values} values, which do not divide "
                       f"head_dim {head_dim}")


def kv_bytes_per_token(shape: Shape, type_k: str, type_v: str) -> int:
    """Bytes one position of one sequence takes in the cache: every layer's key and value rows."""
    kv_dim = shape.n_kv_heads * shape.head_dim
    return shape.n_layers * (row_bytes(type_k, kv_dim) + row_bytes(type_v, kv_dim))


def kv_sink_bytes(shape: Shape, type_k: str, type_v: str) -> int:
    """Bytes of one sequence's sink slots: position 0 of each layer's iq4_nl keys / values, as q8_0."""
    kv_dim = shape.n_kv_heads * shape.head_dim
    return shape.n_layers * sum(row_bytes(SINK_TYPES[t], kv_dim) for t in (type_k, type_v) if t in SINK_TYPES)


# ----------------------------------------------------------------------------------------------
# sources


def shape_from_bin(path: Path) -> Shape:
    """The shape in a kvc (or llama2.c) checkpoint's header; the weights are the file's bytes."""
    with open(path, "rb") as f:
        head = f.read(fmt.HEADER_BYTES)
    if head[:4] == fmt.MAGIC:
        c = _kvc_config(head)
        kind = "kvc checkpoint"
    else:
        try:
            c = fmt.read_llama2c_header(head).config
        except fmt.FormatError as e:
            raise MemError(f"{path}: neither a kvc, GGUF nor llama2.c checkpoint ({e})") from None
        kind = "llama2.c checkpoint"
    return Shape(c.n_layers, c.n_kv_heads, c.head_dim, c.n_heads, c.seq_len, path.stat().st_size,
                 f"{path} ({kind})", path)


def _kvc_config(head: bytes) -> fmt.Config:
    """The Config in a kvc header's bytes, checked as the loader checks it."""
    if len(head) < fmt.HEADER_BYTES:
        raise MemError("file too short for a kvc header")
    h = fmt.unpack_header(head)
    if h["version"] != fmt.VERSION:
        raise MemError(f"unsupported kvc version {h['version']}")
    values = {name: h[f"config.{name}"] for name in fmt.CONFIG_FIELDS}
    problem = fmt.config_error(values)
    if problem:
        raise MemError(f"bad kvc header: {problem}")
    return fmt.Config(**values)


def setting(values: dict, key: str, where: str, default: int | None = None) -> int:
    """values[key] (`default` when absent or null) as a positive int; MemError naming `where` and key."""
    value = values.get(key)
    if value is None:
        if default is None:
            raise MemError(f"{where} lacks {key}")
        value = default
    return positive(value, f"{where} {key}")


def shape_from_gguf(path: Path) -> Shape:
    """The shape in a GGUF file's metadata ({arch}.block_count, .attention.head_count(_kv), ...)."""
    import gguf

    try:
        fields = gguf.GGUFReader(str(path)).fields
    except Exception as e:  # the reader raises whatever its parsing hits
        raise MemError(f"{path}: cannot read GGUF ({e})") from None
    where = f"{path}: GGUF metadata"
    if "general.architecture" not in fields:
        raise MemError(f"{where} lacks general.architecture")
    arch = fields["general.architecture"].contents()
    p = f"{arch}."
    meta = {key: f.contents() for key, f in fields.items() if key.startswith(p)}  # not the tokenizer's arrays
    n_heads = setting(meta, p + "attention.head_count", where)
    head_dim = setting(meta, p + "attention.key_length", where, setting(meta, p + "embedding_length", where) // n_heads)
    return Shape(setting(meta, p + "block_count", where), setting(meta, p + "attention.head_count_kv", where, n_heads),
                 head_dim, n_heads, setting(meta, p + "context_length", where), path.stat().st_size,
                 f"{path} (GGUF, {arch})", weights_note="the GGUF file, in its own weight types")


def shape_from_hf(path: Path) -> Shape:
    """The shape in an HF config.json (num_hidden_layers, num_key_value_heads, head_dim, ...)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MemError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise MemError(f"{path}: not a JSON object")
    where = f"{path}:"
    n_heads = setting(cfg, "num_attention_heads", where)
    head_dim = setting(cfg, "head_dim", where, setting(cfg, "hidden_size", where) // n_heads)
    has_context = cfg.get("max_position_embeddings") is not None
    context = setting(cfg, "max_position_embeddings", where) if has_context else None
    return Shape(setting(cfg, "num_hidden_layers", where), setting(cfg, "num_key_value_heads", where, n_heads),
                 head_dim, n_heads, context, None, f"{path} (HF config)")


def shape_from_preset(name: str) -> Shape:
    """A preset's published shape (weights unknown)."""
    layers, heads, kv_heads, head_dim, context = PRESETS[name]
    return Shape(layers, kv_heads, head_dim, heads, context, None, f"preset {name}")


def shape_from_source(source: str) -> Shape:
    """The shape of SOURCE: a file or folder if one is there, else a preset's name."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise MemError(f"{source}: a folder without a config.json")
    if not path.is_file():
        if source in PRESETS:
            return shape_from_preset(source)
        raise MemError(f"no file or preset named {source!r} (presets: {', '.join(PRESETS)})")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return shape_from_gguf(path)
    if path.suffix == ".json" or magic[:1] == b"{":
        return shape_from_hf(path)
    return shape_from_bin(path)


def shape_from_args(args: argparse.Namespace) -> Shape:
    """The shape named by SOURCE or by --layers/--kv-heads/--head-dim [--heads], not both."""
    explicit = {"--layers": args.layers, "--kv-heads": args.kv_heads, "--head-dim": args.head_dim}
    if args.source is not None:
        if any(v is not None for v in (*explicit.values(), args.heads)):
            raise MemError("give SOURCE or --layers/--kv-heads/--head-dim, not both")
        return shape_from_source(args.source)
    missing = [name for name, v in explicit.items() if v is None]
    if missing:
        raise MemError(f"give SOURCE, or {', '.join(missing)} (with --layers, --kv-heads and --head-dim)")
    for name, v in (*explicit.items(), ("--heads", args.heads)):
        if v is not None:
            positive(v, name)
    if args.heads is not None and args.heads % args.kv_heads:
        raise MemError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return Shape(args.layers, args.kv_heads, args.head_dim, args.heads)


# ----------------------------------------------------------------------------------------------
# the report


def scratch_bytes(shape: Shape, seq_len: int, type_k: str, type_v: str, threads: int | None) -> int | None:
    """Activation bytes of one sequence, from the engine (kvc.Model.memory()); None without a checkpoint."""
    if shape.checkpoint is None:
        return None
    from .model import Model

    try:
        model = Model(shape.checkpoint, seq_len=seq_len, cache_type_k=type_k, cache_type_v=type_v, threads=threads)
    except (ValueError, OSError) as e:
        raise MemError(str(e)) from None
    try:
        return model.memory()["scratch"]
    finally:
        model.close()


def cost(shape: Shape, seq_len: int | None, batch: int, type_k: str, type_v: str,
         threads: int | None = None) -> dict:
    """Everything the report shows, as the JSON object `--json` prints."""
    if seq_len is None:
        if shape.context is None:
            raise MemError("the source gives no context length: pass --seq-len")
        seq_len = shape.context
    positive(seq_len, "--seq-len")
    positive(batch, "--batch")
    for t in (type_k, type_v):
        check_type(t, shape.head_dim)
    if shape.checkpoint is not None and seq_len > shape.context:
        raise MemError(f"--seq-len {seq_len} is beyond the model's context of {shape.context} tokens")
    per_token = kv_bytes_per_token(shape, type_k, type_v)
    sink = kv_sink_bytes(shape, type_k, type_v)
    kv = (per_token * seq_len + sink) * batch
    scratch = scratch_bytes(shape, seq_len, type_k, type_v, threads)
    mha = None if shape.n_heads is None else kv * shape.n_heads // shape.n_kv_heads
    return {
        "source": shape.source, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "context": shape.context,
        "seq_len": seq_len, "batch": batch, "cache_type_k": type_k, "cache_type_v": type_v,
        "k_bytes_per_value": per_value(type_k), "v_bytes_per_value": per_value(type_v),
        "kv_bytes_per_token": per_token, "kv_sink_bytes": sink, "kv_bytes": kv, "weights_bytes": shape.weights_bytes,
        "weights_note": shape.weights_note, "scratch_bytes": None if scratch is None else scratch * batch,
        "total_bytes": kv + (shape.weights_bytes or 0) + (scratch or 0) * batch,
        "mha_kv_bytes": mha, "gqa_saving": None if mha is None else shape.n_heads / shape.n_kv_heads,
    }


def human(n: int) -> str:
    """n bytes in decimal and binary units: "10.7 GB, 10 GiB"."""
    def scaled(base: int, units: tuple[str, ...]) -> str:
        value, unit = float(n), units[0]
        for unit in units:
            if value < base or unit == units[-1]:
                break
            value /= base
        return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"  # 1000..1023 KiB: no 1.02e+03

    return f"{scaled(1000, ('B', 'kB', 'MB', 'GB', 'TB'))}, {scaled(1024, ('B', 'KiB', 'MiB', 'GiB', 'TiB'))}"


def formula(r: dict) -> str:
    """The cache's formula with this model's numbers, term by term."""
    dims = (f"{r['n_layers']} layers x {r['n_kv_heads']} kv_heads x {r['head_dim']} head_dim x "
            f"{r['seq_len']} seq_len x {r['batch']} batch")
    if r["cache_type_k"] == r["cache_type_v"]:
        return f"2 (K, V) x {dims} x {r['k_bytes_per_value']} bytes per value ({r['cache_type_k']})"
    return (f"{dims} x ({r['k_bytes_per_value']} K {r['cache_type_k']} + "
            f"{r['v_bytes_per_value']} V {r['cache_type_v']} bytes per value)")


def gqa_line(r: dict) -> str:
    """What grouped-query attention saves against one KV head per query head."""
    heads, kv_heads = r["n_heads"], r["n_kv_heads"]
    if heads == kv_heads:
        return f"MHA: {kv_heads} KV heads, one per query head (no GQA saving)"
    kind = "MQA" if kv_heads == 1 else "GQA"
    return (f"{kind}: {kv_heads} KV heads for {heads} query heads; with one per query head the cache would be "
            f"{r['mha_kv_bytes']:,} bytes ({human(r['mha_kv_bytes'])}): {kind} saves {r['gqa_saving']:g}x")


def report(r: dict) -> str:
    """The human-readable report of cost()'s result."""
    heads = "" if r["n_heads"] is None else f"{r['n_heads']} heads, "
    context = "" if r["context"] is None else f", context {r['context']}"
    lines = [
        f"source:    {r['source']}: {r['n_layers']} layers, {heads}{r['n_kv_heads']} KV heads, "
        f"head_dim {r['head_dim']}{context}",
        f"cache:     K {r['cache_type_k']}, V {r['cache_type_v']}",
        f"KV cache = {formula(r)}",
        f"         = {r['kv_bytes_per_token']:,} bytes per token ({human(r['kv_bytes_per_token'])}) "
        f"x {r['seq_len']} tokens x {r['batch']} sequence{'s' if r['batch'] > 1 else ''}",
    ]
    if r["kv_sink_bytes"]:
        lines.append(f"         + {r['kv_sink_bytes']:,} bytes per sequence (position 0 as q8_0, iq4_nl's sink)")
    lines += [
        f"         = {r['kv_bytes']:,} bytes ({human(r['kv_bytes'])})",
    ]
    if r["weights_bytes"] is not None:
        lines.append(f"weights  = {r['weights_bytes']:,} bytes ({human(r['weights_bytes'])}, {r['weights_note']})")
    if r["scratch_bytes"] is not None:
        lines.append(f"scratch  = {r['scratch_bytes']:,} bytes ({human(r['scratch_bytes'])}, activations, "
                     f"{r['batch']} x kvc.Model(...).memory()['scratch'])")
    known = ["KV cache"] + [part for part in ("weights", "scratch") if r[f"{part}_bytes"] is not None]
    lines.append(f"total    = {r['total_bytes']:,} bytes ({human(r['total_bytes'])}: {' + '.join(known)})")
    if r["n_heads"] is not None:
        lines.append(gqa_line(r))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are MemError: one `error:` line and exit status 1, like the rest."""

    def error(self, message: str):
        raise MemError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _Parser(prog="python -m kvc.mem", description=__doc__, allow_abbrev=False,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help=f"a .bin, a .gguf, a config.json or a preset ({', '.join(PRESETS)})")
    ap.add_argument("--seq-len", type=int, help="positions per sequence (default: the model's context)")
    ap.add_argument("--batch", type=int, default=1, help="sequences, each with its own cache (default 1)")
    ap.add_argument("-ctk", "--cache-type-k", default="f32", help=f"key type: {', '.join(CACHE_TYPES)} (default f32)")
    ap.add_argument("-ctv", "--cache-type-v", default="f32", help="value type (default f32)")
    ap.add_argument("--layers", type=int, help="number of layers (instead of SOURCE)")
    ap.add_argument("--kv-heads", type=int, help="KV heads per layer (instead of SOURCE)")
    ap.add_argument("--head-dim", type=int, help="values per head (instead of SOURCE)")
    ap.add_argument("--heads", type=int, help="query heads, for the GQA comparison")
    ap.add_argument("--threads", type=int, help="threads the scratch is sized for (.bin; default: the engine's)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads is not None:
            positive(args.threads, "--threads")
        r = cost(shape_from_args(args), args.seq_len, args.batch, args.cache_type_k, args.cache_type_v, args.threads)
    except (MemError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
