"""How close two models' logits are: top-1 agreement, KL divergence and perplexity on the fixed text."""
from __future__ import annotations

import os

import numpy as np

from ..model import Model
from .workload import FIXED_TEXT


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, test: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Top-1 agreement and KL(ref || test) per position (nats) of two (T, vocab) logit arrays;
    with targets (the next token at each position), each one's perplexity too."""
    if ref.shape != test.shape or ref.ndim != 2 or not ref.shape[0]:
        raise ValueError(f"need two equal (T, vocab) logit arrays, got {ref.shape} and {test.shape}")
    lp, lq = _log_softmax(ref), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    out = {
        "positions": int(ref.shape[0]),
        "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }
    if targets is not None:
        idx = np.arange(len(targets))
        out["ppl_ref"] = float(np.exp(-lp[idx, targets].mean()))
        out["ppl_test"] = float(np.exp(-lq[idx, targets].mean()))
    return out


def quality(ref_path: str | os.PathLike, test_path: str | os.PathLike, text: str = FIXED_TEXT,
            max_tokens: int | None = None, threads: int | None = None) -> dict:
    """Run `text` (BOS first) through both models with forward() and compare their logits at every
    position: top-1 agreement, mean/max KL(ref || test) in nats, perplexity of each on the text."""
    with Model(ref_path, threads=threads) as ref:  # one model in memory at a time
        tokens = ref.encode(text, bos=True)[:max_tokens]
        if len(tokens) > ref.config.seq_len:
            raise ValueError(f"text is {len(tokens)} tokens but the model's context is {ref.config.seq_len}")
        ref_logits = ref.forward(tokens, 0)
    with Model(test_path, threads=threads) as test:
        if test.encode(text, bos=True)[:max_tokens] != tokens:
            raise ValueError("the two models tokenize the text differently")
        test_logits = test.forward(tokens, 0)
    out = compare_logits(ref_logits[:-1], test_logits[:-1], np.asarray(tokens[1:]))
    out["tokens"] = len(tokens)
    return out
