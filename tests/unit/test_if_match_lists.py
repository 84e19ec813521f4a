"""An ``If-Match`` list and its weak tags in the engine's :class:`Expected`: it holds at any of
its strong versions and never through a weak tag (RFC 9110's strong comparison); its 412 names
the current version (and revision) and the versions named; it crosses to a remote host whole
(a Ray host checks what the front parsed) and is not logged."""

from __future__ import annotations

import pytest

from app.engine import persist
from app.engine.ops import Configure, Expected
from app.engine.ops.base import ECHOED_VERSIONS
from app.errors import PreconditionFailed

ray_host = pytest.importorskip("app.engine.ray_host")

LIST = Expected(4, None, "If-Match", others=(5,), weak=True)  # "4", "5", W/"6"
WEAK = Expected(None, None, "If-Match", weak=True)  # W/"6" alone


def refusal(expected: Expected, version: int, revision: int) -> PreconditionFailed:
    with pytest.raises(PreconditionFailed) as refused:
        expected.check_at(version, revision)
    assert refused.value.field == "If-Match"
    assert (refused.value.extra["current_version"],
            refused.value.extra["current_revision"]) == (version, revision)
    return refused.value


def test_a_list_holds_at_any_strong_version_and_a_weak_tag_at_none() -> None:
    for version in (4, 5):
        LIST.check_at(version, 9)
    assert refusal(LIST, 6, 9).extra["base_versions"] == [4, 5]
    weak = refusal(WEAK, 6, 9)
    assert "base_version" not in weak.extra and "weak" in weak.detail
    assert Expected(7, 3, "If-Match").versions == (7,) and Expected(None, 3).versions is None
    Expected(None, 3).check_at(6, 3)  # (a revision alone names no version)


def test_a_long_list_is_named_in_part_with_its_count() -> None:
    """A 412 names the first :data:`ECHOED_VERSIONS` versions of a list, in the order sent,
    and how many it had (``base_versions_count``); its detail as many. It echoed them all (a
    list as long as the request head allows: 10,000s)."""
    many = Expected(999, None, "If-Match", others=tuple(range(5000)))
    refused = refusal(many, 7000, 9)
    assert refused.extra["base_versions"] == [999, *range(ECHOED_VERSIONS - 1)]
    assert refused.extra["base_versions_count"] == 5001
    shown = ", ".join(str(v) for v in [999, *range(ECHOED_VERSIONS - 1)])
    assert f"at none of {shown} and {5001 - ECHOED_VERSIONS} more:" in refused.detail
    assert len(refused.detail) < 300
    exactly = Expected(0, None, "If-Match", others=tuple(range(1, ECHOED_VERSIONS)))
    whole = refusal(exactly, 100, 9)
    assert whole.extra["base_versions"] == list(range(ECHOED_VERSIONS))
    assert whole.extra["base_versions_count"] == ECHOED_VERSIONS
    assert "more" not in whole.detail
    assert refusal(LIST, 6, 9).extra["base_versions_count"] == 2


def test_a_list_crosses_to_a_remote_host_whole_and_is_not_logged() -> None:
    for expected in (LIST, WEAK, Expected(5, 9, others=(7,))):
        assert Expected.from_json(expected.to_json()) == expected
        op = Configure({"max_staleness": 2}, request=True, noop_kept=True, expected=expected)
        back = ray_host.op_from_wire(ray_host.op_to_wire(op))
        assert isinstance(back, Configure) and back == op
        logged = persist.decode_record(persist.encode_record(persist.Record(op, 3, 6, []))).op
        assert isinstance(logged, Configure) and logged.expected is None
        assert (logged.options, logged.noop_kept) == (op.options, True)
