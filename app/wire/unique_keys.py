"""JSON texts whose objects name each key once: a duplicated key is refused, not taken last.

orjson (like most parsers) keeps the last of two members with the same name, so
``{"lr": 0.1, "lr": 10}`` would step with 10 where a reader of the body sees 0.1 first. Going
through every object's members as written (the standard library's ``object_pairs_hook``) costs
several times orjson's parse (about 4x for a 10 MB tensor body), so the check counts instead:
outside strings, a JSON text holds one ``:`` per object member, so its colons number the
members as written plus the colons inside its strings. The parsed value holds every member
once and the same strings (a ``\\u003a`` escape, the only other way to write a colon, is first
rewritten as another character): when the two counts agree, no key was written twice. A text
whose counts disagree (a duplicated key, or a list of numbers the count passed over that held
something else) is counted again in full, and only a text that truly repeats a key is read
member by member, to name it.

Cost (1e6 float32 in one JSON tensor, 10.6 MB): orjson's parse 70-100 ms, the check 2-4 ms
(one numpy comparison over the text, in pieces, and a memchr for a backslash; the walk passes
over a list of numbers whole). A text that repeats a key, or escapes a colon, costs more (it
is refused, or parsed twice).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import orjson

from app.errors import BadRequest

#: the longest ``path`` a problem names (a key may be as long as the body allows)
FIELD_MAX = 200
#: texts shorter than this are counted as bytes, longer ones by numpy, in pieces of _PIECE
_SMALL = 1 << 11
_PIECE = 1 << 18
_COLON, _BACKSLASH = ord(":"), ord("\\")
#: a text with a colon in fewer than this many bytes on average (1,000 small tensors: one in
#: 16) is counted again by writing its parsed value (C), others by the walk (:func:`_colons`,
#: Python, passing over lists of numbers: a few large tensors)
_DENSE = 64
#: the escapes that write a colon inside a string
_COLON_ESCAPES = (b"\\u003a", b"\\u003A")
_NUMBERS = (int, float)


class DuplicateKey(Exception):
    """A JSON object names ``key`` twice; ``path`` is the key's dotted path from the root
    (``param_groups.0.lr``), ``parent`` the object's (``param_groups.0``; ``""``: the root).
    ``key`` and ``path`` are None for a repeat nested too deeply to name (its count shows it)."""

    def __init__(self, key: str | None, parent: str = "") -> None:
        if key is None:
            text = "an object names a key twice (nested too deeply to say where)"
        else:
            where = f"the object at {parent}" if parent else "the top-level object"
            text = f"key {key!r:.60} appears twice in {where}"
        super().__init__(text)
        self.key = key
        self.parent = parent
        path = None if key is None else f"{parent}.{key}" if parent else key
        #: cut as other problems' fields are: a key may be as long as the body allows
        self.path = None if path is None else path[:FIELD_MAX]


def _colons(value: Any, *, whole: bool) -> int:
    """Members of every object in ``value`` plus the colons in its strings (keys too). Unless
    ``whole``, a list whose first item is a number is taken for a list of numbers (a tensor's
    data) and passed over: a count that then falls short is counted again ``whole``."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            total += len(item)
            for key, member in item.items():
                if ":" in key:
                    total += key.count(":")
                kind = type(member)
                if kind is str:
                    if ":" in member:
                        total += member.count(":")
                elif kind is dict or kind is list:
                    stack.append(member)
        elif type(item) is list:
            if not item or (not whole and type(item[0]) in _NUMBERS):
                continue
            for member in item:
                kind = type(member)
                if kind is str:
                    if ":" in member:
                        total += member.count(":")
                elif kind is dict or kind is list:
                    stack.append(member)
        elif type(item) is str and ":" in item:
            total += item.count(":")
    return total


def _scan(text: bytes | bytearray | memoryview) -> tuple[int, bool]:
    """The colons in ``text``, and whether it holds a backslash (an escape: maybe of a colon).
    Counted by numpy in cache-sized pieces (any buffer, no copy; ``bytes.count`` takes about
    0.7 ns a byte here, three times numpy's), a tiny text by ``bytes.count``; the backslash
    found by ``find`` (memchr)."""
    n = len(text)
    if n < _SMALL:
        raw = bytes(text) if isinstance(text, memoryview) else text
        return raw.count(b":"), b"\\" in raw
    chars = np.frombuffer(text, dtype=np.uint8)
    colons = 0
    for at in range(0, n, _PIECE):
        colons += int(np.count_nonzero(chars[at:at + _PIECE] == _COLON))
    if isinstance(text, memoryview):
        escapes = any(bool((chars[at:at + _PIECE] == _BACKSLASH).any())
                      for at in range(0, n, _PIECE))
    else:
        escapes = text.find(b"\\") >= 0
    return colons, escapes


def check_unique_keys(text: bytes | bytearray | memoryview, parsed: Any) -> None:
    """Raise :class:`DuplicateKey` when a JSON object in ``text`` (valid JSON, parsed into
    ``parsed`` by orjson) names a key twice."""
    written, escapes = _scan(text)
    if escapes:
        raw = bytes(text)
        if any(e in raw for e in _COLON_ESCAPES):
            # colons written as escapes are colons in the parsed strings but not in the text:
            # count a copy that writes them as ';' (an escape inside a string either way)
            for escape in _COLON_ESCAPES:
                raw = raw.replace(escape, b"\\u003b")
            parsed = orjson.loads(raw)
    if written * _DENSE > len(text):
        # many members for the text's size (many small tensors): orjson writes the parsed
        # value again with one colon per member plus its strings' colons, faster than the walk
        # (but for a value nested deeper than orjson writes: the walk)
        try:
            again = _scan(_dumps(parsed))[0]
        except orjson.JSONEncodeError:
            again = None
        if written == again:
            return
        if again is not None:
            _name_duplicate(text)
            return
    if written == _colons(parsed, whole=False) or written == _colons(parsed, whole=True):
        return
    _name_duplicate(text)


#: an object of more members than this is written again a piece at a time (:func:`_dumps`)
_DUMPS_PIECE = 8192


def _dumps(value: Any) -> bytes:
    """``orjson.dumps(value)``; an object of many members written :data:`_DUMPS_PIECE` members
    at a time (each ``dumps`` holds the interpreter lock throughout, every other thread
    waiting: a safetensors header of 100,000 entries held it ~20 ms). Only its colons are
    counted: the pieces' braces and commas differ from the whole's, not its colons."""
    if type(value) is not dict or len(value) <= _DUMPS_PIECE:
        return orjson.dumps(value)
    members = iter(value.items())
    pieces = []
    while piece := dict(itertools.islice(members, _DUMPS_PIECE)):
        pieces.append(orjson.dumps(piece))
    return b"".join(pieces)


class _Repeated:
    """Stands, while the standard library reads the text, for an object that repeats a key:
    the key, and the dotted path to the object that repeats it from the value it stands in."""

    def __init__(self, key: str, parent: str = "") -> None:
        self.key = key
        self.parent = parent

    def inside(self, step: str) -> _Repeated:
        return _Repeated(self.key, f"{step}.{self.parent}" if self.parent else step)


def _found_in(value: Any) -> _Repeated | None:
    """The path to a repeated key inside ``value`` (a member's value: a list is searched
    through its nested lists), if any."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, at = stack.pop()
        if isinstance(item, _Repeated):
            return item.inside(at) if at else item
        if isinstance(item, list):
            stack.extend((v, f"{at}.{i}" if at else str(i)) for i, v in enumerate(item))
    return None


def _name_duplicate(text: bytes | bytearray | memoryview) -> None:
    """Read ``text`` member by member (only a text known to repeat a key comes here) and raise
    :class:`DuplicateKey` for the first object, in document order of completion, that does."""
    seen_any = False

    def pairs(members: list[tuple[str, Any]]) -> Any:
        nonlocal seen_any
        out: dict[str, Any] = {}
        for key, value in members:
            if key in out:
                seen_any = True
                return _Repeated(key)
            out[key] = value
        if seen_any:  # a repeat further in: carry its path up
            for key, value in members:
                found = _found_in(value)
                if found is not None:
                    return found.inside(key)
        return out

    try:
        root = json.loads(bytes(text), object_pairs_hook=pairs)
    except RecursionError:  # (orjson reads deeper than the standard library can)
        raise DuplicateKey(None) from None
    found = _found_in(root)
    if found is None:  # (the counts disagreed for another reason: nothing is repeated)
        return
    raise DuplicateKey(found.key, found.parent)


def refuse_duplicate_keys(text: bytes | bytearray | memoryview, parsed: Any, what: str,
                          within: str = "", field: str = "body") -> None:
    """400 ``duplicate_key`` when an object of the JSON text ``text`` (parsed into ``parsed``)
    names a key twice (:func:`check_unique_keys`), naming the key's dotted path after
    ``within`` in the problem's field and its detail (``field``, the whole text's, for one
    nested too deeply to name). ``what`` says which text (``request body``, ``safetensors
    header``)."""
    try:
        check_unique_keys(text, parsed)
    except DuplicateKey as exc:
        if within and exc.key is not None:
            exc = DuplicateKey(exc.key, f"{within}.{exc.parent}" if exc.parent else within)
        raise BadRequest(f"the {what} is ambiguous: {exc} (each key may appear once in an "
                         "object)", code="duplicate_key",
                         field=(exc.path if exc.path is not None else within or field
                                )[:FIELD_MAX]) from None
