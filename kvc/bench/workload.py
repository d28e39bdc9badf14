"""What the bench measures: the sizes of one configuration's runs and the fixed text it feeds."""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field, replace

# Fixed English text for the quality check and as prompt material (cycled when a prompt is longer).
# Written for this bench; about 400 SmolLM2 tokens.
FIXED_TEXT = """\
The lighthouse at the end of the harbour was built in the spring of a very dry year, when the \
river had fallen so low that the barges could not reach the town. The stone came instead by cart \
from a quarry in the hills, and every load was checked by the master mason, a careful man who \
measured each block twice before he let it be lifted into place. He believed that a tower was only \
as straight as its worst stone, and he told the apprentices so every morning.

The lamp itself arrived in the autumn. It was packed in straw inside three wooden crates, and the \
glass prisms were wrapped one by one in cloth. When the keeper opened the last crate he found a \
short letter from the workshop that had ground the lenses. It explained how to clean the glass with \
soft cotton and a little vinegar, how to trim the wick so that the flame would not smoke, and why \
the clockwork that turned the lens had to be wound every four hours through the night.

For the first winter the keeper kept a notebook. He wrote down the weather at dusk and at dawn, the \
ships he saw passing, and the number of times the clockwork had to be wound. Most nights were quiet. \
On a few, the fog rolled in so thickly that the beam seemed to stop a short distance from the glass, \
and he rang the bell by hand until his arms ached. In the spring he counted the entries and found \
that the light had not failed once, although the oil had frozen twice and a gull had broken a pane.

Years later, when the town replaced the lamp with an electric one, the notebook was found in a \
drawer of the keeper's desk. The museum now keeps it in a glass case next to one of the old prisms, \
and children who visit are asked to guess how many hours of winding it took to keep one ship safe.
"""


@dataclass
class Sizes:
    """What one configuration measures: prompt lengths, decode length, cache positions, repeats."""

    prefill: list[int] = field(default_factory=lambda: [128, 512])
    decode: int = 256
    positions: list[int] = field(default_factory=lambda: [0, 256, 512, 1024, 2048])
    steps: int = 16  # decode steps timed at each position
    repeats: int = 2  # prefill runs per length (best kept)
    prompt: int = 32  # prompt before the decode run

    @property
    def seq_len(self) -> int:
        """The context to open the model with: room for every measurement, and no more."""
        return max(max(self.prefill, default=1), self.prompt + self.decode,
                   max(self.positions, default=0) + self.steps) + 8


FULL = Sizes()
QUICK = Sizes(prefill=[32, 128], decode=32, positions=[0, 128, 256, 512], steps=8, repeats=1, prompt=16)
BANDWIDTH_BYTES = {"full": 1 << 30, "quick": 256 << 20}  # array size of the read-bandwidth measurement


def cycle_tokens(first: list[int], rest: list[int], n: int) -> list[int]:
    """n tokens: first (the text with BOS), then rest (the text without) as often as needed."""
    out = list(first)
    while len(out) < n:
        out.extend(rest)
    return out[:n]


# The KV cache's element types measured with each weight type (the cache-types issue): every type
# for K+V with Q8_0 weights, q4_0 both plain and with its default Hadamard rotation ("+rot"), iq4_nl
# rotated as it is by default; the f32 model with the f32, f16 and q8_0 caches.
CACHE_CONFIGS = {
    "q8_0": ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_0+rot", "iq4_nl+rot"],
    "f32": ["f32", "f16", "q8_0"],
}


@dataclass
class CacheSizes:
    """What the cache-type and no-cache measurements run: positions, steps, lengths, thread count."""

    positions: list[int] = field(default_factory=lambda: [0, 256, 512, 1024, 2048, 4096, 8192])
    steps: int = 16  # decode steps timed at each position (a position past the context moves back)
    no_cache: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # tokens generated both ways
    no_cache_prompt: int = 8  # the prompt before them
    threads: int = 2
    paired: list[int] = field(default_factory=lambda: [2048, 8192])  # positions timed against 0 alternately
    # (cache_types.measure_paired; position 0 also against the f32 cache: the short-context cost)
    paired_steps: int = 300  # rounds of the paired measurement (each model decodes one token a round)


FULL_CACHE = CacheSizes()
QUICK_CACHE = CacheSizes(positions=[0, 256, 1024], steps=8, no_cache=[8, 16, 32],
                         paired=[1024], paired_steps=16)


@dataclass
class LongSizes:
    """What the long-context part runs: kvc.longppl's tokens and windows (each with and without sinks, and
    H2O where the engine has it), and kvc.bench.window's long generation with one window."""

    tokens: int = 16_384  # scored by kvc.longppl (dense: the first config.seq_len of them)
    windows: list[int] = field(default_factory=lambda: [256, 512, 1024])
    generate: int = 20_000  # tokens of the long generation
    every: int = 2_000  # ms/token and RSS reported per this many
    window: int = 1024  # of the long generation


FULL_LONG = LongSizes()
QUICK_LONG = LongSizes(tokens=1024, windows=[256], generate=2_000, every=500, window=256)


# ----------------------------------------------------------------------------
# Options that override these sizes (python -m kvc.bench and python -m kvc.bench.serving)

def _at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {minimum}")
    return value


def _items(text: str) -> list[str]:
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} holds no numbers")
    return items


def positive_int(text: str) -> int:
    """argparse type: a count or a length, at least 1."""
    return _at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: a count where 0 means none."""
    return _at_least(text, 0)


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated counts or lengths, each at least 1 (e.g. 128,512)."""
    return [_at_least(x, 1) for x in _items(text)]


def positions(text: str) -> list[int]:
    """argparse type: comma-separated cache positions, 0 or more (e.g. 0,2048,8192)."""
    return [_at_least(x, 0) for x in _items(text)]


def overridden(preset, **given):
    """A copy of the preset sizes (its lists copied too) with the options that were given (not None) in
    place of its fields."""
    return replace(copy.deepcopy(preset), **{name: value for name, value in given.items() if value is not None})
