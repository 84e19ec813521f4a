"""A session's per-step history: a bounded ring of rows, one per applied (or skipped) step.

Columnar: one float64 column per field (``n``, ``step``, ``version``, ``time``, ``lr.0``,
``grad_norm.0``, ..., ``scalars.loss``), NaN where a row has no value (a client scalar not
sent that step, norms of a session with metrics off). Columns grow by doubling up to the
ring's capacity, then the oldest rows are overwritten. ``n`` numbers the rows of a session
from 1, skipped steps included, and is never reused (equal to ``step`` when no step was
skipped), so ``since`` polling never misses or repeats a row.

The ring belongs to the session: it is written into snapshots (its columns as tensors) and the
steps logged after a snapshot rebuild their rows at replay (the metrics are recomputed bitwise,
the client's scalars and the step's wall time travel in the step's log record).

Queries (:meth:`History.select`) copy a range out on the device worker; downsampling
(:func:`downsample`: per bucket the min and max of every column, so spikes stay visible) and
encoding run elsewhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.errors import Invalid

#: per param group fields (``lr.0``, ``grad_norm.1``, ...)
GROUP_FIELDS = ("lr", "grad_norm", "update_norm", "param_norm", "update_ratio")
#: per step fields every row has (``staleness``/``workers`` only in parameter-server steps)
STEP_FIELDS = ("n", "step", "version", "time", "skipped", "nonfinite", "staleness", "workers")
#: fields whose values are integers (JSON and CSV write them without a fraction)
INT_FIELDS = frozenset({"n", "step", "version", "skipped", "nonfinite", "staleness", "workers"})
SCALARS_PREFIX = "scalars."
MAX_CAPACITY = 10_000_000
_GROUP_RE = re.compile(r"^(" + "|".join(GROUP_FIELDS) + r")\.([0-9]{1,6})$")
_INITIAL = 1024


def check_capacity(value: object, field: str = "history") -> int:
    if type(value) is not int or not 0 <= value <= MAX_CAPACITY:
        raise Invalid(f"{field} must be an integer from 0 (keep no history) to {MAX_CAPACITY} "
                      "(rows of per-step metrics the session keeps)", code="invalid_option",
                      field=field)
    return value


def known_field(name: str) -> bool:
    """Whether ``name`` is a column any session may have (present in this one or not)."""
    return (name in STEP_FIELDS or _GROUP_RE.match(name) is not None
            or (name.startswith(SCALARS_PREFIX) and len(name) > len(SCALARS_PREFIX)))


class History:
    def __init__(self, capacity: int, next_n: int = 1) -> None:
        self.capacity = capacity
        self.next_n = next_n  # the n of the next row
        self._cols: dict[str, np.ndarray] = {}
        self._size = 0  # allocated rows
        self._start = 0  # index of the oldest row
        self._count = 0  # rows held

    def __len__(self) -> int:
        return self._count

    @property
    def fields(self) -> list[str]:
        return list(self._cols)

    def has(self, name: str) -> bool:
        """Whether the history has a column ``name``."""
        return name in self._cols

    def append(self, row: dict[str, float]) -> int:
        """Add a row (``n`` is assigned here); returns its n."""
        n = self.next_n
        self.next_n += 1
        if self.capacity == 0:
            return n
        if self._count == self._size and self._size < self.capacity:
            self._grow(min(self.capacity, max(_INITIAL, 2 * self._size)))
        if self._count < self._size:
            at = (self._start + self._count) % self._size
            self._count += 1
        else:  # full: overwrite the oldest
            at = self._start
            self._start = (self._start + 1) % self._size
        for name in row:
            if name not in self._cols:
                self._cols[name] = np.full(self._size, np.nan)
        for name, col in self._cols.items():
            col[at] = row.get(name, np.nan)
        self._cols["n"][at] = n
        return n

    def fill(self, n: int, values: dict[str, float]) -> None:
        """Set ``values`` in row ``n`` (nothing when the ring no longer holds it): the norms of
        a step whose answer did not carry them, taken after it (``metrics.after_answer``)."""
        if not self._count:
            return
        newest = (self._start + self._count - 1) % self._size
        back = int(self._cols["n"][newest]) - n
        if not 0 <= back < self._count:
            return
        at = (newest - back) % self._size
        if self._cols["n"][at] != n:
            return
        for name, value in values.items():
            if name not in self._cols:
                self._cols[name] = np.full(self._size, np.nan)
            self._cols[name][at] = value

    def _grow(self, size: int) -> None:
        """Reallocate every column to ``size`` rows, oldest first (also shrinks)."""
        keep = min(self._count, size)
        for name, col in list(self._cols.items()):
            ordered = self._ordered(col)[self._count - keep:]
            new = np.full(size, np.nan)
            new[:keep] = ordered
            self._cols[name] = new
        if "n" not in self._cols:
            self._cols["n"] = np.full(size, np.nan)
        self._size, self._start, self._count = size, 0, keep

    def _ordered(self, col: np.ndarray, copy: bool = False) -> np.ndarray:
        """``col``'s rows oldest first: a view when the ring has not wrapped (unless ``copy``),
        else a new array."""
        if self._start + self._count <= self._size:
            view = col[self._start:self._start + self._count]
            return view.copy() if copy else view
        return np.concatenate((col[self._start:], col[:(self._start + self._count) % self._size]))

    def resize(self, capacity: int) -> None:
        """A new capacity; the newest rows are kept."""
        self.capacity = capacity
        if capacity == 0:
            self._cols, self._size, self._start, self._count = {}, 0, 0, 0
        elif self._size > capacity:
            self._grow(capacity)

    def bounds(self) -> tuple[int | None, int | None]:
        """(n of the oldest row held, n of the newest), or Nones when empty."""
        if not self._count:
            return None, None
        n = self._cols["n"]
        return int(n[self._start]), int(n[(self._start + self._count - 1) % self._size])

    def select(self, since: int | None, until: int | None,
               fields: list[str] | None) -> dict[str, np.ndarray]:
        """Copies of the rows with ``since < n <= until`` (columns ``fields``, or all; ``n``
        always first)."""
        if not self._count:
            return {"n": np.empty(0)} | {f: np.empty(0) for f in fields or [] if f != "n"}
        n = self._ordered(self._cols["n"])
        lo = 0 if since is None else int(np.searchsorted(n, since, side="right"))
        hi = len(n) if until is None else int(np.searchsorted(n, until, side="right"))
        hi = max(lo, hi)
        names = ["n"] + [f for f in (fields if fields is not None else self._cols) if f != "n"]
        out: dict[str, np.ndarray] = {}
        for name in names:
            col = self._cols.get(name)
            out[name] = (self._ordered(col)[lo:hi].copy() if col is not None
                         else np.full(hi - lo, np.nan))
        return out

    # ------------------------------------------------------------------ persistence
    def to_tree(self) -> dict[str, Any]:
        """The ring for a snapshot: copies of its columns (a snapshot is encoded and written on
        an I/O thread; it must not see a row being written)."""
        cols = {name: torch.from_numpy(self._ordered(col, copy=True))
                for name, col in self._cols.items()}
        return {"capacity": self.capacity, "next_n": self.next_n, "columns": cols}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> History:
        h = cls(int(tree["capacity"]), int(tree["next_n"]))
        cols: dict[str, Any] = tree.get("columns") or {}
        count = len(cols["n"]) if "n" in cols else 0
        if count:
            size = min(h.capacity, max(_INITIAL, count)) if h.capacity else 0
            size = max(size, count)
            for name, t in cols.items():
                col = np.full(size, np.nan)
                col[:count] = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                h._cols[name] = col
            h._size, h._count = size, count
        return h


# ---------------------------------------------------------------------------- queries
@dataclass
class HistoryQuery:
    since: int | None = None
    until: int | None = None
    #: column names or families (``lr``: every ``lr.i``; ``scalars``: every client scalar)
    fields: list[str] | None = None
    #: downsample to at most this many buckets (min and max of each column per bucket)
    points: int | None = None


@dataclass
class HistoryResult:
    """Selected history rows, columnar; with ``points``, each column is split into
    ``name.min`` and ``name.max`` per bucket."""

    capacity: int
    first: int | None  # n of the oldest row the session still holds
    last: int | None  # n of the newest
    rows: int  # rows in the selected range (before downsampling)
    points: int | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)


def expand_fields(wanted: list[str] | None, have: list[str],
                  groups: int | None = None) -> list[str] | None:
    """Column names for ``wanted`` (families expanded against the columns the session has);
    422 for a name that is no column any session could have, or (``groups``: the session's
    param groups) a group column of a group the session does not have, or one written with
    a leading zero (``lr.01``): a typo, never an empty column."""
    if wanted is None:
        return None
    out: list[str] = []
    for name in wanted:
        group = _GROUP_RE.match(name)
        if group is not None and groups is not None:
            index = int(group[2])
            if index >= groups:
                raise Invalid(f"history field {name!r:.60} names param group {index}; this "
                              f"session has {groups} (0 to {groups - 1})",
                              code="invalid_query", field="fields")
            if group[2] != str(index):
                raise Invalid(f"history field {name!r:.60}: write the group as a plain index, "
                              f"{group[1] + '.' + str(index)!r}", code="invalid_query",
                              field="fields")
        if name in GROUP_FIELDS:
            out.extend(f for f in have if f.startswith(name + ".") and _GROUP_RE.match(f))
        elif name == "scalars":
            out.extend(f for f in have if f.startswith(SCALARS_PREFIX))
        elif known_field(name):
            out.append(name)
        else:
            raise Invalid(f"unknown history field {name!r:.60}; fields are {list(STEP_FIELDS)}, "
                          f"{', '.join(f + '.<group>' for f in GROUP_FIELDS)}, "
                          "scalars.<name>, or the families "
                          f"{', '.join(GROUP_FIELDS)} and scalars",
                          code="invalid_query", field="fields")
    seen: set[str] = set()
    return [f for f in out if not (f in seen or seen.add(f))]  # type: ignore[func-returns-value]


def downsample(columns: dict[str, np.ndarray], points: int) -> dict[str, np.ndarray]:
    """At most ``points`` buckets of consecutive rows; per bucket and column the min and the max
    (NaN ignored), as ``name.min`` / ``name.max``: the global min and max of every column are
    always kept, and so is any spike. Fewer rows than ``points``: one row per bucket."""
    n = columns["n"]
    rows = len(n)
    if rows == 0:
        return {f"{k}.{s}": np.empty(0) for k in columns for s in ("min", "max")}
    buckets = min(points, rows)
    starts = np.unique(np.linspace(0, rows, buckets + 1)[:-1].astype(np.int64))
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore"):
        for name, col in columns.items():
            out[f"{name}.min"] = np.fmin.reduceat(col, starts)
            out[f"{name}.max"] = np.fmax.reduceat(col, starts)
    return out


def jsonable(name: str, col: np.ndarray) -> list[Any]:
    """A column for JSON: integers for integer fields, ``null`` for absent values (NaN),
    ``{"$float": "inf"}`` for infinities (the service's encoding of non-finite floats)."""
    base = name.rsplit(".", 1)[0] if name.endswith((".min", ".max")) else name
    finite = np.isfinite(col)
    if finite.all():
        if base in INT_FIELDS:
            return col.astype(np.int64).tolist()  # type: ignore[no-any-return]
        return col.tolist()  # type: ignore[no-any-return]
    values: list[Any] = col.tolist()
    for i in np.flatnonzero(~finite).tolist():
        x = values[i]
        values[i] = None if math.isnan(x) else {"$float": "inf" if x > 0 else "-inf"}
    if base in INT_FIELDS:
        values = [int(v) if isinstance(v, float) else v for v in values]
    return values


def csv_text(columns: dict[str, np.ndarray]) -> str:
    """The columns as CSV (a header row, then one line per row): integers as integers, floats
    in their shortest exact form, empty for absent values, ``inf``/``-inf`` for infinities."""
    names = list(columns)
    cells: list[list[str]] = []
    for name in names:
        col = columns[name]
        base = name.rsplit(".", 1)[0] if name.endswith((".min", ".max")) else name
        values = col.tolist()
        if base in INT_FIELDS:
            cells.append(["" if v != v else ("inf" if v == math.inf else "-inf")
                          if math.isinf(v) else str(int(v)) for v in values])
        else:
            cells.append(["" if v != v else repr(v) for v in values])
    header = ",".join(_csv_name(n) for n in names)
    lines = [header]
    lines.extend(",".join(row) for row in zip(*cells, strict=True))
    return "\n".join(lines) + "\n"


def _csv_name(name: str) -> str:
    if any(c in name for c in ',"\n\r'):
        return '"' + name.replace('"', '""') + '"'
    return name
