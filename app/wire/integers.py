"""Integers written as text (query values, ETags, JSON object keys): ASCII decimal digits only.

``str.isdigit`` also takes digits such as ``²``, which ``int()`` refuses (a 500 where a 422
belongs), and ``int()`` takes more than plain digits (``"١"``, ``" 5"``, ``"+5"``, ``"1_0"``):
every place that reads an integer from text asks :func:`int_text`."""

from __future__ import annotations

from typing import Any

#: the integers a service file or answer can hold (a log record's JSON, a description): what a
#: JSON text writes of a C ``int64``
INT64 = (-(2**63), 2**63 - 1)
#: the integers a group option may hold: what a JSON text carries (an unsigned 64-bit one too),
#: and a create takes (an option is never counted up: its session's export imports back)
OPTION_INTS = (INT64[0], 2**64 - 1)


def int_text(text: object, max_digits: int, *, signed: bool = False) -> int | None:
    """``text`` as an int when it is a string of 1 to ``max_digits`` ASCII decimal digits
    (after one leading ``-`` when ``signed``); else None."""
    if not isinstance(text, str):
        return None
    digits = text[1:] if signed and text.startswith("-") else text
    if not (0 < len(digits) <= max_digits and digits.isascii() and digits.isdigit()):
        return None
    return int(text)


def ints_as_text(tree: Any, low: int, high: int) -> Any:
    """``tree`` (dicts, lists and scalars) with each integer outside ``low..high`` as its
    decimal text: what an answer writes of an option no JSON number holds (servers before the
    checks that refuse one took it: an LBFGS ``max_eval`` past 64 bits), rather than fail."""
    if type(tree) is int:
        return tree if low <= tree <= high else str(tree)
    if isinstance(tree, dict):
        return {k: ints_as_text(v, low, high) for k, v in tree.items()}
    if isinstance(tree, list):
        return [ints_as_text(v, low, high) for v in tree]
    return tree
