"""Number types for argparse options, one copy each for every command.

Each function takes the option's text and returns the value, or raises
``argparse.ArgumentTypeError`` with a message that says what was expected
and repeats what was given; argparse prints it after the option's name::

    moe-mpi generate: error: argument --max-tokens/-m: expected a positive integer, got '0'

(A plain ``ValueError`` would instead give argparse's generic "invalid
positive_int value", which names the function, not the rule.)
"""

from __future__ import annotations

import argparse
from typing import List

__all__ = [
    "float_list",
    "int_list",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "unit_interval",
]


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _float(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1, e.g. a count of tokens or iterations.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is < 1.
    """
    expected = "a positive integer"
    value = _int(text, expected)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0, e.g. a number of warm-up iterations.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is < 0.
    """
    expected = "an integer >= 0"
    value = _int(text, expected)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (``inf`` allowed, ``nan`` not), e.g. a temperature.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is < 0 or nan.
    """
    value = _float(text, "a number")
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1], e.g. a top-p.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is outside
            (0, 1] (or nan).
    """
    value = _float(text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def int_list(text: str) -> List[int]:
    """Comma-separated positive integers: ``"1,8"`` -> ``[1, 8]``.

    Empty items are ignored (``"1,8,"`` is ``[1, 8]``); at least one is needed.

    Raises:
        argparse.ArgumentTypeError: An item is not an integer or is < 1, or
            there are none.
    """
    expected = "comma-separated positive integers such as 1,8"
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values


def float_list(text: str) -> List[float]:
    """Comma-separated numbers: ``"2,1,1"`` -> ``[2.0, 1.0, 1.0]``.

    Only the syntax is checked: what the numbers must be (e.g. one positive
    weight per rank) is for the code that uses them, which knows the number
    of ranks. Empty items are ignored; at least one number is needed.

    Raises:
        argparse.ArgumentTypeError: An item is not a number, or there are none.
    """
    expected = "comma-separated numbers such as 2,1,1"
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values
