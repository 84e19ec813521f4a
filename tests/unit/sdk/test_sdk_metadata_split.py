"""The SDK finds a header's leading ``__metadata__`` with a pattern whose strings are runs of
plain bytes between escapes (``optserve._safetensors._STRING``); it must split every header
exactly where the pattern of one alternation per byte did (the same strings, the same ends),
on valid metadata and on any bytes."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optserve import _safetensors

_OLD_STRING = rb'"(?:[^"\\]|\\.)*"'
_OLD_FLAT = re.compile(rb"\{\s*(?:%s\s*:\s*%s\s*(?:,\s*%s\s*:\s*%s\s*)*)?\}"
                       % (_OLD_STRING, _OLD_STRING, _OLD_STRING, _OLD_STRING), re.DOTALL)
_TOKENS = [b'"', b"\\", b"a", b"{", b"}", b":", b",", b" ", b"\n", b"\\\\", b'\\"',
           "\u00e9".encode(), b"\x01", b'"x":"y"', b"\\u0041"]


def _both(head: bytes) -> tuple[tuple[bytes | None, bytes], tuple[bytes | None, bytes]]:
    new = _safetensors._split(head)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_safetensors, "_FLAT", _OLD_FLAT)
        old = _safetensors._split(head)
    return new, old


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=5),
       st.sampled_from([b',"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"}",
                        b' , "t":{}}', b"x"]))
def test_metadata_objects_split_as_the_per_byte_pattern_did(
        meta: dict[str, str], rest: bytes) -> None:
    # (escaped as writers do: quotes, backslashes and control characters inside strings)
    head = b'{"__metadata__":' + json.dumps(meta, ensure_ascii=False).encode() + rest
    new, old = _both(head)
    assert new == old
    if rest != b"x":
        assert new[0] is not None and json.loads(new[0]) == meta


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_any_bytes_split_as_the_per_byte_pattern_did(
        parts: list[bytes]) -> None:
    for head in (b'{"__metadata__":{' + b"".join(parts),
                 b'{"__metadata__":{"' + b"".join(parts) + b'"}}'):
        new, old = _both(head)
        assert new == old
