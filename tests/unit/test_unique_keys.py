"""app.wire.unique_keys: the count that finds a key written twice in a JSON text agrees with
reading every object member by member (the standard library's ``object_pairs_hook``) on
generated texts, escapes of a colon, colons in keys and strings, lists of numbers holding
something else; a large tensor body is passed by the count alone (never read member by
member); a repeated key is named by its path."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.wire import unique_keys
from app.wire.unique_keys import DuplicateKey, check_unique_keys


def repeats_a_key(text: str) -> bool:
    """The reference: some object of ``text`` names a key twice."""
    found = False

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        keys = [k for k, _ in members]
        found = found or len(set(keys)) != len(keys)
        return dict(members)

    json.loads(text, object_pairs_hook=pairs)
    return found


def checked(text: str) -> DuplicateKey | None:
    try:
        check_unique_keys(text.encode(), orjson.loads(text))
    except DuplicateKey as exc:
        return exc
    return None


# keys and strings drawn from characters that matter here: colons, quotes, backslashes
KEYS = st.text(alphabet=st.sampled_from(list("ab:\"\\ é")), max_size=4)
SCALARS = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                    st.booleans(), st.none(), KEYS)


def json_texts() -> st.SearchStrategy[str]:
    """JSON texts whose objects are written member by member (a key may come twice), with
    colons sometimes written as ``\\u003a`` escapes."""
    def obj(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        member = st.tuples(KEYS, children).map(lambda kv: f"{json.dumps(kv[0])}: {kv[1]}")
        return st.lists(member, max_size=4).map(lambda ms: "{" + ", ".join(ms) + "}")

    def array(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")

    leaves = SCALARS.map(json.dumps)
    tree = st.recursive(leaves, lambda c: st.one_of(obj(c), array(c)), max_leaves=20)
    escaped = st.booleans()
    return st.tuples(tree, escaped).map(
        lambda te: te[0].replace(":\"", "\\u003a\"") if te[1] and '":' not in te[0]
        else te[0])


@settings(max_examples=600, deadline=None)
@given(json_texts())
def test_the_count_agrees_with_reading_member_by_member(text: str) -> None:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return  # (an escape rewrite made it invalid: nothing to compare)
    assert (checked(text) is not None) == repeats_a_key(text), text


@pytest.mark.parametrize(("text", "key", "path"), [
    ('{"a": 1, "a": 2}', "a", "a"),
    ('{"g": {"w": {"dtype": "f", "dtype": "g"}}}', "dtype", "g.w.dtype"),
    ('{"p": [{"lr": 1}, {"lr": 1, "lr": 2}]}', "lr", "p.1.lr"),
    ('{"a": "x:y", "b": [1, {"c": 1, "c": 2}]}', "c", "b.1.c"),
    ('{"a\\u003a": 1, "a\\u003a": 1}', "a:", "a:"),
    ('{"a": "\\u003a", "a": 2}', "a", "a"),
    ('[1, {"x": 1, "y": {"z": [[{"q": 1, "q": 2}]]}}]', "q", "1.y.z.0.0.q"),
    ('{"a.b": {"c": 1, "c": 1}}', "c", "a.b.c"),
])
def test_a_repeated_key_is_named_by_its_path(text: str, key: str, path: str) -> None:
    exc = checked(text)
    assert exc is not None and (exc.key, exc.path) == (key, path)


@pytest.mark.parametrize("text", [
    '{"a": "\\u003a", "b": 2}',            # a colon escaped in a string
    '{"a:b": "c::d", "e": ["f:", 1]}',     # colons in keys and strings
    '{"data": [1, 2, "x:y", {"k": 1}]}',   # a list of numbers holding more (counted again)
    '{"k\\\\u003a": 1, "j": 2}',           # an escaped backslash, then "u003a": no colon
    "[]", "{}", '"a:b"', "3",
])
def test_texts_that_repeat_no_key_pass(text: str) -> None:
    assert not repeats_a_key(text)
    assert checked(text) is None


def test_a_large_tensor_body_passes_by_the_count_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """1e6 float32 in one JSON tensor (with a non-finite value written as a string, and the
    step's options): checked without reading it member by member (which takes several times
    orjson's parse)."""
    def never(_: object) -> None:
        raise AssertionError("read member by member")

    monkeypatch.setattr(unique_keys, "_name_duplicate", never)
    data: list[Any] = np.random.default_rng(0).standard_normal(1_000_000).tolist()
    data[7] = "NaN"
    body = orjson.dumps({"grads": {"w": {"dtype": "float32", "shape": [1_000_000],
                                         "data": data}},
                         "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99]}]})
    check_unique_keys(memoryview(bytearray(body)), orjson.loads(body))
    twice = body[:-1] + b', "param_groups": []}'
    monkeypatch.undo()
    with pytest.raises(DuplicateKey) as found:
        check_unique_keys(twice, orjson.loads(twice))
    assert found.value.path == "param_groups"


def test_too_deep_to_name_is_still_refused() -> None:
    """A repeat nested deeper than the standard library reads (orjson takes 1,024 levels):
    refused all the same, without naming it."""
    text = "[" * 1000 + '{"a": 1, "a": 2}' + "]" * 1000
    with pytest.raises(DuplicateKey):
        check_unique_keys(text.encode(), orjson.loads(text))


@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 2049, (1 << 18) - 1, 1 << 18, (1 << 18) + 3,
                                  3 * (1 << 18) + 17])
def test_the_scan_counts_as_bytes_count_in_any_buffer(size: int) -> None:
    """The colon count and the backslash flag equal ``bytes.count`` and ``in`` for bytes,
    bytearray and memoryview texts around the sizes where the scan changes method or piece,
    with colons and a backslash at the last byte."""
    rng = random.Random(size)
    for last in (b":", b"\\", b"a"):
        raw = bytes(rng.choice(b'ab:"{} ') for _ in range(max(size - 1, 0))) + last[:size]
        for text in (raw, bytearray(raw), memoryview(bytearray(raw))):
            assert unique_keys._scan(text) == (raw.count(b":"), b"\\" in raw)


@pytest.mark.parametrize("dense", [True, False])
def test_both_counts_find_a_repeat_and_pass_a_clean_text(dense: bool) -> None:
    """Many small objects (a colon every few bytes: counted again by writing the parsed
    value) and a few with long lists of numbers (by the walk) both pass a clean text and
    refuse one that repeats a key, naming it."""
    if dense:
        members = [f'"p{i}": {{"dtype": "float32", "shape": [4], "data": [0.5, 1, 2, 3]}}'
                   for i in range(500)]
    else:
        members = ['"w": {"dtype": "float32", "shape": [3000], "data": ['
                   + ", ".join("0.125" for _ in range(3000)) + "]}"]
    clean = ("{" + ", ".join(members) + ', "note": "a:b"}').encode()
    assert (clean.count(b":") * unique_keys._DENSE > len(clean)) is dense
    check_unique_keys(clean, orjson.loads(clean))
    repeated = clean[:-1] + b', "note": "c"}'
    with pytest.raises(DuplicateKey) as info:
        check_unique_keys(repeated, orjson.loads(repeated))
    assert info.value.path == "note"


def test_a_text_nested_deeper_than_orjson_writes_is_still_counted() -> None:
    """A dense text nested 300 deep (orjson parses 1,024 levels but writes only 254) is
    counted by the walk: taken clean, refused with a repeat."""
    clean = b'{"a":' * 300 + b"1" + b"}" * 300
    check_unique_keys(clean, orjson.loads(clean))
    repeated = b'{"a":' * 300 + b'1,"a":2' + b"}" * 300
    with pytest.raises(DuplicateKey):
        check_unique_keys(repeated, orjson.loads(repeated))
