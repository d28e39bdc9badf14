"""kvc/format.py's HEADER_FIELDS is the kvc header's one definition: run.c's KvcHeader and Config,
the cffi Config in kvc/_lib.py, the constants both languages share and README's byte table are
checked against it here.

run.c's side comes from a probe compiled against run.c itself, which prints offsetof/sizeof/type
facts and every shared constant as JSON.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess

import pytest

from helpers import ROOT
from kvc import format as fmt

# struct code -> the type's name in README and in the probe's output; the C type it stands for
TYPES = {"4s": "char[4]", "I": "uint32", "i": "int32", "f": "float32", "Q": "uint64"}
C_TYPES = {"char[4]": "char[4]", "uint32": "uint32_t", "int32": "int32_t", "float32": "float", "uint64": "uint64_t"}
# the families of constants shared with run.c, by their C prefix
ENUM_PREFIXES = ("WEIGHT_", "TOK_", "PRETOK_", "FLAG_", "PIECE_", "CHAT_")
C_DEFINES = ("KVC_HEADER_BYTES", "KVC_VERSION", "LLAMA2C_MAGIC", "LLAMA2C_HEADER_BYTES", "LLAMA2C_LEGACY_HEADER_BYTES",
             "Q4_BLOCK")


def header_offsets() -> dict[str, int]:
    """Each header field's byte offset, from HEADER_FIELDS alone (little-endian, no padding)."""
    offsets, codes = {}, "<"
    for name, code in fmt.HEADER_FIELDS:
        offsets[name] = struct.calcsize(codes)
        codes += code
    return offsets


def python_constants() -> dict[str, int]:
    """format.py's constants under run.c's names."""
    out = {f"WEIGHT_{name.upper()}": v for name, v in fmt.WEIGHT_TYPES.items()}
    out.update((f"PIECE_{name}", getattr(fmt, name))
               for name in ("NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"))
    out.update((name, v) for name, v in vars(fmt).items()
               if name.startswith(("TOK_", "PRETOK_", "FLAG_", "CHAT_")) and type(v) is int)
    return out


def run_c_enum_names() -> set[str]:
    """The shared families' names in run.c's enums, found in the source."""
    src = (ROOT / "run.c").read_text()
    names = set()
    for body in re.findall(r"\benum\s*\{([^}]*)\}", src):
        names.update(n for n in re.findall(r"\b([A-Z][A-Z0-9_]*)\s*=", body) if n.startswith(ENUM_PREFIXES))
    return names


def probe_source() -> str:
    """A C program that includes run.c and prints its side of every fact checked here, as JSON."""
    ints: list[tuple[str, str]] = []  # (JSON key, C expression)
    strings: list[tuple[str, str]] = [("KVC_MAGIC", "KVC_MAGIC")]
    for name, _ in fmt.HEADER_FIELDS:
        member = f"((KvcHeader *)0)->{name}"
        ints += [(f"offset {name}", f"offsetof(KvcHeader, {name})"), (f"size {name}", f"sizeof({member})")]
        # the member's type by name: the first of C_TYPES it is, else "?"
        which = "".join(f"__builtin_types_compatible_p(__typeof__({member}), {ctype}) ? \"{t}\" : "
                        for t, ctype in C_TYPES.items())
        strings.append((f"type {name}", which + '"?"'))
    for name in fmt.CONFIG_FIELDS:
        ints.append((f"Config offset {name}", f"offsetof(Config, {name})"))
    ints += [("sizeof KvcHeader", "sizeof(KvcHeader)"), ("sizeof Config", "sizeof(Config)"),
             ("offset config", "offsetof(KvcHeader, config)")]
    ints += [(name, name) for name in C_DEFINES + tuple(sorted(python_constants()))]
    entries = [f'    printf("\\"{key}\\": %lld", (long long)({expr}));' for key, expr in ints]
    entries += [f'    printf("\\"{key}\\": \\"%s\\"", {expr});' for key, expr in strings]
    return "\n".join([
        "#define KVC_LIBRARY",
        f'#include "{ROOT / "run.c"}"',
        "#include <stddef.h>",
        "#include <stdio.h>",
        "int main(void) {",
        '    printf("{\\n");',
        '\n    printf(",\\n");\n'.join(entries),
        '    printf("\\n}\\n");',
        "    return 0;",
        "}",
    ])


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(probe_source())
    cc = subprocess.run(["cc", "-O0", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-function",
                         "-o", str(d / "probe"), str(d / "probe.c"), "-lm"], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)


def test_header_fields_match_run_c(c_facts):
    """Every field of HEADER_FIELDS is a KvcHeader member at the same offset, with the same size and type."""
    for name, offset in header_offsets().items():
        code = dict(fmt.HEADER_FIELDS)[name]
        assert c_facts[f"offset {name}"] == offset, f"{name}: run.c puts it at {c_facts[f'offset {name}']}"
        assert c_facts[f"size {name}"] == struct.calcsize("<" + code), name
        assert c_facts[f"type {name}"] == TYPES[code], f"{name}: run.c's type is {c_facts[f'type {name}']}"


def test_header_size_and_room(c_facts):
    """KvcHeader holds nothing HEADER_FIELDS lacks, and both fit in the header's room."""
    assert c_facts["sizeof KvcHeader"] == fmt.HEADER.size
    assert c_facts["KVC_HEADER_BYTES"] == fmt.HEADER_BYTES
    assert fmt.HEADER.size <= fmt.HEADER_BYTES


def test_config_struct_matches(c_facts):
    """run.c's Config is the header's config.* fields, in order, and format.Config has them in that order."""
    offsets = header_offsets()
    base = offsets["config.dim"]
    assert c_facts["offset config"] == base
    for name in fmt.CONFIG_FIELDS:
        assert c_facts[f"Config offset {name}"] == offsets[f"config.{name}"] - base, name
    codes = "<" + "".join(code for name, code in fmt.HEADER_FIELDS if name.startswith("config."))
    assert c_facts["sizeof Config"] == struct.calcsize(codes)
    assert list(fmt.Config.__dataclass_fields__) == fmt.CONFIG_FIELDS


def test_cffi_config_matches_run_c(c_facts):
    """kvc/_lib.py's cffi declaration of Config (what kvc.Model reads) is run.c's, field by field."""
    from kvc._lib import ffi

    fields = ffi.typeof("Config").fields
    assert [name for name, _ in fields] == fmt.CONFIG_FIELDS
    for name, field in fields:
        assert ffi.offsetof("Config", name) == c_facts[f"Config offset {name}"], name
        code = dict(fmt.HEADER_FIELDS)[f"config.{name}"]
        assert field.type.cname == {"i": "int", "f": "float"}[code], name
    assert ffi.sizeof("Config") == c_facts["sizeof Config"]


def test_constants_match_run_c(c_facts):
    """Magic, version, llama2.c's header facts and every enum value are the same in both languages."""
    assert c_facts["KVC_MAGIC"].encode() == fmt.MAGIC
    assert c_facts["KVC_VERSION"] == fmt.VERSION
    assert c_facts["LLAMA2C_MAGIC"] == fmt.LLAMA2C_MAGIC
    assert c_facts["LLAMA2C_HEADER_BYTES"] == fmt.LLAMA2C_HEADER_BYTES
    assert c_facts["LLAMA2C_LEGACY_HEADER_BYTES"] == fmt.LLAMA2C_LEGACY_HEADER_BYTES
    assert c_facts["Q4_BLOCK"] == fmt.Q4_BLOCK
    for name, value in python_constants().items():
        assert c_facts[name] == value, f"{name}: run.c {c_facts[name]}, format.py {value}"


def test_enum_families_complete():
    """run.c has no shared constant that format.py lacks, and format.py none that run.c lacks."""
    assert run_c_enum_names() == set(python_constants())


def readme_header_table() -> tuple[str, list[list[str]]]:
    """README's kvc file format section heading and its header table's rows, split into cells."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## The kvc file format \(version (\d+)\)\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README lacks the kvc file format section"
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in m.group(2).splitlines() if line.startswith("|")]
    assert rows[0] == ["offset", "type", "field", "meaning"] and set("".join(rows[1])) <= set("-")
    return m.group(1), rows[2:]


def test_readme_header_table():
    """README's table lists HEADER_FIELDS: same offsets, types and names, in order, then the padding."""
    version, rows = readme_header_table()
    assert int(version) == fmt.VERSION
    *fields, padding = rows
    readme_type = {readme: code for code, readme in TYPES.items()}
    offsets = header_offsets()
    assert [(int(off), readme_type.get(typ), name) for off, typ, name, _ in fields] == \
        [(offsets[name], code, name) for name, code in fmt.HEADER_FIELDS]
    assert f"`{fmt.MAGIC.decode()}`" in fields[0][3] and fields[1][3] == str(fmt.VERSION)
    assert int(padding[0]) == fmt.HEADER.size and padding[1:3] == ["", ""]
    assert f"up to byte {fmt.HEADER_BYTES}" in padding[3]
