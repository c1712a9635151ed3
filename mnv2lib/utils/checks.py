"""Argument checks shared by the configs: each raises a ValueError that names the field, the
value and what is allowed. ``bool`` is a subclass of ``int`` in Python; here it is never
accepted as a number (``epochs=True`` is a mistake, not 1 epoch)."""
from __future__ import annotations

import math
import numbers

import numpy as np


def is_number(value) -> bool:
    """A real number (int, float, numpy scalar), not a bool and not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain_number(value):
    """A numpy scalar as the Python number it holds (np.int64(3) -> 3, np.float32(0.5) -> 0.5, np.bool_ ->
    bool); anything else unchanged. Run keys hash and records store the value: 0 and np.int64(0) must be
    one value, and json cannot write numpy integers."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def plain_numbers(obj):
    """``obj`` with every numpy scalar inside dicts, lists and tuples made a Python number."""
    if isinstance(obj, dict):
        return {key: plain_numbers(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [plain_numbers(value) for value in obj]
    if type(obj) is tuple:
        return tuple(plain_numbers(value) for value in obj)
    return plain_number(obj)


def check_int(field: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                          f"<= {maximum}" if maximum is not None else "") if b)
        raise ValueError(f"{field}: got {value!r}; allowed values are integers{' ' + bounds if bounds else ''}")


def check_number(field: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number in [low, high] (an open end where ``*_open``)."""
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        bounds = " and ".join(parts)
        raise ValueError(f"{field}: got {value!r}; allowed values are finite numbers"
                         f"{' ' + bounds if bounds else ''}")


def check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: got {value!r}; allowed values are True or False")
