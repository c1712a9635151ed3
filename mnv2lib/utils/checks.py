"""Argument checks shared by the configs: each raises a ValueError that names the field, the
value and what is allowed. ``bool`` is a subclass of ``int`` in Python; here it is never
accepted as a number (``epochs=True`` is a mistake, not 1 epoch)."""
from __future__ import annotations

import math
import numbers


def is_number(value) -> bool:
    """A real number (int, float, numpy scalar), not a bool and not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
