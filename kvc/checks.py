"""Checks of the values the Python API passes to C: integers, floats and token ids, refused with a
TypeError or ValueError before they reach cffi."""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np

C_INT_MAX = 2**31 - 1  # the C API takes int counts, positions and ids
SEED_MAX = 2**64 - 1  # seeds are unsigned long long
FLOAT32_MAX = float(np.finfo(np.float32).max)


def int_arg(name: str, value: object, low: int, high: int | None = None) -> int:
    """value as a Python int in low..high (high None: no bound): TypeError unless an integer, ValueError
    outside the range (so nothing out of range reaches cffi, whose conversion raises OverflowError)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def float_arg(name: str, value: object) -> float:
    """value as a Python float for a C float: TypeError unless a real number, ValueError for finite
    values beyond float32's range (C would see an infinity). NaN and the infinities pass."""
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    message = f"{name} is beyond float32's range (magnitude at most {FLOAT32_MAX:.4g})"
    try:
        result = float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(message) from None
    if math.isfinite(result) and abs(result) > FLOAT32_MAX:
        raise ValueError(message)
    return result


def token_ids(tokens: Sequence[int], vocab_size: int) -> np.ndarray:
    """Token ids as a flat int32 array: TypeError unless integers, ValueError for ids outside the vocab."""
    arr = np.asarray(tokens)
    if arr.dtype.kind not in "iu":  # bools, floats, or Python ints numpy found no integer type for (2**64)
        items = np.asarray(tokens, dtype=object).reshape(-1)
        try:
            arr = np.array([operator.index(t) for t in items], dtype=object)
        except TypeError:
            raise TypeError("token ids must be integers") from None
    arr = arr.reshape(-1)
    if arr.size:
        low, high = arr.min(), arr.max()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got {low if low < 0 else high}")
    return arr.astype(np.int32)
