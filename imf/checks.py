"""The argument checks shared by imf's configs, objectives, trainer, sampler and evaluations: each raises one
ValueError that names the argument (after its owner, e.g. "TrainConfig: lr") and says what it accepts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable


def is_real(value) -> bool:
    """A real number that is not a bool (True is an int to Python, never a number a knob means)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _named(owner: str | None, name: str) -> str:
    return f"{owner}: {name}" if owner else name


def check_int(owner: str | None, name: str, value, low: int, why: str = "") -> None:
    """An int (not a bool, not a float) >= low; `why` follows the bound in the message."""
    if type(value) is not int or value < low:
        raise ValueError(f"{_named(owner, name)} must be an int >= {low}{why}, got {value!r}")


def check_flag(owner: str | None, name: str, value) -> None:
    if type(value) is not bool:
        raise ValueError(f"{_named(owner, name)} must be True or False, got {value!r}")


def check_flags(owner: str | None, **flags) -> None:
    for name, value in flags.items():
        check_flag(owner, name, value)


def check_real(owner: str | None, name: str, value, accepts: Callable[[float], bool], what: str) -> None:
    """A real number that `accepts` takes (NaN fails every comparison, so a range refuses it); `what` describes
    the accepted values ("a number in [0, 1)")."""
    if not is_real(value) or not accepts(value):
        raise ValueError(f"{_named(owner, name)} must be {what}, got {value!r}")


def check_setting(
    owner: str | None, name: str, value, low: float, high: float = math.inf, *, open_low=False, open_high=False
) -> None:
    """A finite real `value` in [low, high] (an open end with open_low / open_high)."""
    if not is_real(value):
        raise ValueError(f"{_named(owner, name)} must be a number, got {value!r}")
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
    check_real(
        owner,
        name,
        value,
        lambda v: (v > low if open_low else v >= low) and (v < high if open_high else v <= high) and math.isfinite(v),
        f"a finite number in {bounds}",
    )
