"""``IdempotencyTable.unchanged_by``: an operation without an ``Idempotency-Key`` (most steps)
skips making the answer the table would keep only where keeping nothing changes nothing."""

from __future__ import annotations

from app.engine.idempotency import IdempotencyTable


def _table(window: int, keys: int) -> IdempotencyTable:
    table = IdempotencyTable(window=window)
    for i in range(keys):
        table.remember(f"k{i}", f"fp{i}", {"version": i})
    return table


def test_no_key_and_no_refusal_within_the_window_changes_nothing() -> None:
    table = _table(4, 3)
    before = table.to_json()
    assert table.unchanged_by([], [])
    table.remember_all([], {"version": 9}, [])
    assert table.to_json() == before


def test_a_key_or_a_refusal_is_kept() -> None:
    table = _table(4, 1)
    assert not table.unchanged_by([("k9", "fp9")], [])
    assert not table.unchanged_by([], [("k8", "fp8", {"status": 409})])


def test_a_table_past_a_lowered_window_is_still_trimmed_by_the_next_operation() -> None:
    """A restored session's window may be set lower than the keys it holds: the next
    operation, keyed or not, forgets the oldest (as before the skip)."""
    table = _table(4, 4)
    table.window = 2
    assert not table.unchanged_by([], [])
    table.remember_all([], {"version": 9}, [])
    assert [k for k, _, _ in table.to_json()] == ["k2", "k3"]
    assert table.unchanged_by([], [])
