"""What decoding a safetensors body finds out, used again by the checks after it
(:class:`BodyTensors`): its header (a session that checked one body against its parameters
passes the next with the same header without checking tensor by tensor) and its runs of
tensors laid end to end (the non-finite check takes one reduction per run). Each shortcut
must answer exactly as the full check does: the same tensors, the same names, the same norms
to the bit, the same refusals."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.interface import GroupSpec
from app.engine.ops.gradients import Step
from app.engine.session import Session, TakenNorms
from app.errors import Invalid
from app.wire.dtypes import SAFETENSORS_NAMES, TORCH_DTYPES
from app.wire.safetensors_body import BodyTensors, read_safetensors

_ST = {TORCH_DTYPES[v]: k for k, v in SAFETENSORS_NAMES.items()}
#: uint8 tensors of odd sizes put the tensors after them at offsets their dtype cannot view
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]


def body_of(parts: list[tuple[str, torch.Tensor]], header_order: list[int]) -> bytearray:
    """A safetensors file of ``parts`` laid out in this order, its header entries written in
    ``header_order`` (file order and header order may differ)."""
    entries: list[tuple[str, dict[str, Any]]] = []
    data = bytearray()
    for name, t in parts:
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append((name, {"dtype": _ST[t.dtype], "shape": list(t.shape),
                               "data_offsets": [len(data), len(data) + len(raw)]}))
        data += raw
    header = json.dumps({entries[i][0]: entries[i][1] for i in header_order}).encode()
    return bytearray(struct.pack("<Q", len(header)) + header + data)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[str, torch.Tensor]], bytearray]:
    count = draw(st.integers(1, 8))
    parts = []
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        n = draw(st.integers(0, 6))
        shape: tuple[int, ...] = (n,) if draw(st.booleans()) or n % 2 else (2, n // 2)
        t = torch.randn(shape, generator=torch.Generator().manual_seed(i)).mul(3).to(dtype)
        if dtype.is_floating_point and n:
            poison = draw(st.sampled_from(["", "", "", "nan", "inf", "huge"]))
            flat = t.view(-1)
            if poison == "nan":
                flat[draw(st.integers(0, n - 1))] = math.nan
            elif poison == "inf":
                flat[draw(st.integers(0, n - 1))] = -math.inf
            elif poison == "huge":  # finite values whose squares overflow
                flat.fill_(torch.finfo(dtype).max / 2)
        parts.append((f"t{i}", t))
    order = draw(st.permutations(range(count)))
    return parts, body_of(parts, list(order))


def norms_bits(norms: TakenNorms) -> dict[tuple[str, ...], list[bytes]]:
    def bits(t: torch.Tensor) -> bytes:
        return t.detach().reshape(1).view(torch.uint8).numpy().tobytes()

    return {names: [bits(t) for t in parts] for names, parts in norms.runs.items()}


@settings(max_examples=300, deadline=None)
@given(bodies())
def test_the_runs_answer_as_the_search_by_data_pointers(
        case: tuple[list[tuple[str, torch.Tensor]], bytearray]) -> None:
    """A decoded body's non-finite check by its runs names the same tensors, and keeps the same
    norms to the bit, as the check that finds the runs by data pointers (the same tensors in a
    plain dict); and the tensors are the file's."""
    parts, buf = case
    body, _ = read_safetensors(buf)
    assert isinstance(body, BodyTensors) and body.header is not None
    want = safetensors.torch.load(bytes(buf))
    assert list(body) == list(json.loads(bytes(buf[8:8 + int.from_bytes(buf[:8], "little")])))
    for name, t in body.items():
        assert t.dtype == want[name].dtype and t.shape == want[name].shape
        assert torch.equal(t.contiguous().view(torch.uint8), want[name].view(torch.uint8))
    # the runs hold every tensor with bytes, unless one lies where its dtype cannot view it
    pos, viewable = 0, True
    for _, t in parts:
        if t.numel() and pos % t.element_size():
            viewable = False
        pos += t.numel() * t.element_size()
    assert bool(body.runs) == (viewable and pos > 0)
    by_runs, by_pointers = TakenNorms(), TakenNorms()
    named = Session.nonfinite_names(body, by_runs)
    assert named == Session.nonfinite_names(dict(body), by_pointers)
    assert sorted(named) == sorted(n for n, t in want.items() if t.is_floating_point()
                                   and t.numel() and not bool(torch.isfinite(t).all()))
    assert norms_bits(by_runs) == norms_bits(by_pointers)
    assert Session.nonfinite_names(body) == Session.nonfinite_names(dict(body))


def test_a_changed_body_forgets_what_it_knew() -> None:
    buf = bytearray(safetensors.torch.save({"a": torch.ones(3), "b": torch.ones(2)}))
    changes: list[Callable[[BodyTensors], object]] = [
        lambda d: d.__setitem__("a", torch.zeros(3)), lambda d: d.__delitem__("a"),
        lambda d: d.pop("a"), lambda d: d.popitem(), lambda d: d.setdefault("c", torch.ones(1)),
        lambda d: d.update({"a": torch.zeros(3)}), lambda d: d.clear(),
        lambda d: d.__ior__({"a": torch.zeros(3)}),
    ]
    for change in changes:
        body, _ = read_safetensors(bytearray(buf))
        assert isinstance(body, BodyTensors) and body.header and body.runs
        change(body)
        assert body.header is None and body.runs == () and body.tiling() is None


def session(**groups: dict[str, torch.Tensor]) -> Session:
    return Session.build("s", "Adam", [GroupSpec(params, {}) for params in groups.values()],
                         {"lr": 0.01}, None, "reject", torch.device("cpu"))


def grads_body(seed: int, **shapes: tuple[int, ...]) -> BodyTensors:
    gen = torch.Generator().manual_seed(seed)
    body, _ = read_safetensors(bytearray(safetensors.torch.save(
        {n: torch.randn(shape, generator=gen) for n, shape in shapes.items()})))
    assert isinstance(body, BodyTensors)
    return body


def test_a_known_header_passes_for_the_same_parameters_only() -> None:
    s = session(g0={"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    first = grads_body(1, w=(2, 3), b=(3,))
    assert not s.known_body(first)
    s.check_tensors(first, "grads")
    assert s.known_body(first) and s.known_body(grads_body(2, w=(2, 3), b=(3,)))
    assert s.on_device(first) is first
    # another header: checked in full, with the refusal naming the field
    assert not s.known_body(grads_body(3, w=(3, 2), b=(3,)))
    with pytest.raises(Invalid) as bad:
        s.check_tensors(grads_body(3, w=(3, 2), b=(3,)), "grads")
    assert bad.value.field == "grads.w" and bad.value.code == "shape_mismatch"
    # a changed body is no longer the body whose header was checked
    changed = grads_body(4, w=(2, 3), b=(3,))
    changed["w"] = torch.zeros(3, 2)
    assert not s.known_body(changed)
    with pytest.raises(Invalid):
        s.check_tensors(changed, "grads")
    # a parameter replaced (another tensor under the same name): the header is checked again
    s.params["w"] = torch.zeros(3, 2)
    assert not s.known_body(first)
    with pytest.raises(Invalid) as bad:
        s.check_tensors(first, "grads")
    assert bad.value.code == "shape_mismatch"


def test_a_known_header_never_skips_a_widening_or_another_dtype() -> None:
    s = session(g0={"w": torch.zeros(4)})
    half, _ = read_safetensors(bytearray(safetensors.torch.save({"w": torch.ones(4).half()})))
    s.check_tensors(half, "grads", upcast=True)
    assert not s.known_body(half)  # a widening happens in on_device: never skipped
    assert s.on_device(half)["w"].dtype == torch.float32
    with pytest.raises(Invalid) as bad:
        s.check_tensors(half, "grads")
    assert bad.value.code == "dtype_mismatch"


def test_steps_on_known_headers_match_torch_and_refuse_nonfinite_whole() -> None:
    """Steps whose bodies share one header (checked once, then known) step exactly as torch
    does; one with a NaN under the known header is refused naming its tensor, and changes
    nothing."""
    init = {"w": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
            "b": torch.randn(3, generator=torch.Generator().manual_seed(1))}
    s = session(g0={n: t.clone() for n, t in init.items()})
    ref = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=0.01)
    for seed in range(5):
        body = grads_body(seed, w=(2, 3), b=(3,))
        op = Step(body)
        op.apply(s, op.check(s))
        for n, p in ref.items():
            p.grad = body[n].clone()
        opt.step()
        assert s.known_body(body)
    for n, p in ref.items():
        assert torch.equal(s.params[n], p.detach())
    poisoned = grads_body(9, w=(2, 3), b=(3,))
    poisoned["b"][1] = math.nan  # in place: still the body's tensors, its header known
    assert s.known_body(poisoned) and poisoned.runs
    before = {n: p.clone() for n, p in s.params.items()}
    with pytest.raises(Invalid) as bad:
        Step(poisoned).check(s)
    assert bad.value.code == "nonfinite_gradient" and bad.value.field == "grads.b"
    assert all(torch.equal(s.params[n], before[n]) for n in before)


@pytest.mark.parametrize("layout", ["aligned", "header order differs", "with an empty tensor",
                                    "unaligned", "small"])
def test_the_answer_in_place_is_the_same_from_the_decoded_tiling(layout: str) -> None:
    """A step's binary answer written over its body: from the tiling decoding found (names in
    file order, kept header entries) it is what the per-tensor search by data pointers makes:
    the same tensors in the same order over the same bytes, and the same header."""
    from app.api.bodies import SMALL_PART, answer_in_place
    from app.wire.safetensors_body import packed_header, safetensors_header

    big = SMALL_PART // 4 + (-100 if layout == "small" else 100)  # small: under SMALL_PART
    parts = [("w", torch.randn(big)), ("b", torch.randn(3, 2).double()),
             ("c", torch.randn(5).half())]
    if layout == "with an empty tensor":
        parts.insert(1, ("e", torch.empty(0)))
    if layout == "unaligned":
        parts.insert(1, ("u", torch.ones(3, dtype=torch.uint8)))
    order = list(range(len(parts)))
    if layout == "header order differs":
        order.reverse()
    buf = body_of(parts, order)
    body, _ = read_safetensors(buf)
    assert isinstance(body, BodyTensors)
    fast, slow = answer_in_place(body, buf), answer_in_place(dict(body), buf)
    assert (fast is None) == (slow is None) == (layout not in ("aligned",
                                                               "header order differs"))
    if fast is None or slow is None:
        return
    assert fast.entries is not None and slow.entries is None
    assert list(fast) == list(slow) == [name for name, _ in parts]
    assert all(fast[n] is slow[n] for n in fast)
    assert fast.buffer.obj is slow.buffer.obj and len(fast.buffer) == len(slow.buffer)
    meta = {"version": "7", "lr": "[0.01]"}
    assert packed_header(fast, meta) == packed_header(slow, meta) == safetensors_header(slow,
                                                                                          meta)


def test_the_last_big_header_is_kept_and_each_body_still_read_as_its_own() -> None:
    """A header over KEEP_HEADER (a session of many tensors) is kept, one at a time: the next
    body with it is not parsed again, and reads its own values; a body cut short under it is
    still refused."""
    from app.errors import BadRequest
    from app.wire import safetensors_header

    names = [f"layer{i:05d}.weight" for i in range(6000)]
    first = bytearray(safetensors.torch.save({n: torch.full((1,), float(i))
                                              for i, n in enumerate(names)}))
    second = bytearray(safetensors.torch.save({n: torch.full((1,), -float(i))
                                               for i, n in enumerate(names)}))
    assert safetensors_header.KEEP_HEADER < int.from_bytes(first[:8], "little")
    safetensors_header._parsed_big_header.cache_clear()
    a, _ = read_safetensors(first)
    b, _ = read_safetensors(second)
    assert safetensors_header._parsed_big_header.cache_info().hits == 1
    assert [float(a[n]) for n in names[:3]] == [0.0, 1.0, 2.0]
    assert [float(b[n]) for n in names[:3]] == [-0.0, -1.0, -2.0]
    with pytest.raises(BadRequest):
        read_safetensors(second[:-4])


def test_an_idle_server_forgets_the_big_header() -> None:
    """The kept parse of a big header (tens of MB for 100,000 tensors) is given back with the
    heap's free pages once the host has been idle."""
    import asyncio
    import time

    from app.engine import CreateSpec, embedded_engine
    from app.wire import safetensors_header

    read_safetensors(bytearray(safetensors.torch.save(
        {f"layer{i:05d}.weight": torch.ones(1) for i in range(6000)})))
    assert safetensors_header._parsed_big_header.cache_info().currsize == 1

    async def main() -> None:
        eng = embedded_engine("cpu")
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"w": torch.zeros(2)})],
                                        {"lr": 0.1}, id="s"))
            deadline = time.monotonic() + 15
            while (safetensors_header._parsed_big_header.cache_info().currsize
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.2)
        finally:
            await eng.stop()

    asyncio.run(main())
    assert safetensors_header._parsed_big_header.cache_info().currsize == 0
    kept = safetensors_header._layouts
    assert all(len(key) <= safetensors_header.KEEP_HEADER for key, _, _ in kept)


def test_new_metadata_with_every_step_keeps_the_checked_entries() -> None:
    """A client sends new ``__metadata__`` with every step (a scheduler's options, a loss):
    the tensor entries are still checked once, and a session knows the next body."""
    from app.wire import safetensors_header

    safetensors_header.forget_headers()
    checked: list[bytes] = []
    real = safetensors_header._check_entries

    def spy(key: bytes, *args: Any) -> Any:
        checked.append(key)
        return real(key, *args)

    tensors = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    safetensors_header._check_entries = spy  # type: ignore[assignment]
    try:
        read = [read_safetensors(bytearray(safetensors.torch.save(
            tensors, {"scalars": json.dumps({"loss": 1.0 / (i + 1)})}))) for i in range(3)]
    finally:
        safetensors_header._check_entries = real  # type: ignore[assignment]
    assert len(checked) == 1
    assert [json.loads(meta["scalars"])["loss"] for _, meta in read] == [1.0, 0.5, 1.0 / 3]
    bodies = [body for body, _ in read]
    assert all(isinstance(b, BodyTensors) and b.header == checked[0] for b in bodies)
    s = session(g0={"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    s.check_tensors(bodies[0], "grads")
    assert s.known_body(bodies[1]) and s.known_body(bodies[2])
    assert all(torch.equal(bodies[2][n], t) for n, t in tensors.items())


_WS = st.sampled_from(["", " ", "\n", "\t ", "\r\n", "\x0c", "\x0b"])


@st.composite
def headers_with_metadata(draw: st.DrawFn) -> tuple[bytes, int]:
    """Headers whose ``__metadata__`` comes first or not, well formed or not: strings with
    quotes, backslashes, escapes and non-ASCII text; JSON's whitespace and other whitespace;
    a trailing comma, a missing one, a non-string value, a second ``__metadata__`` later."""
    meta = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=8), max_size=3))
    ascii_only = draw(st.booleans())
    meta_text = json.dumps(meta, ensure_ascii=ascii_only)
    how = draw(st.sampled_from(["plain", "plain", "trailing comma", "missing comma",
                                "number", "second later", "not first", "no entries",
                                "raw control", "bad escape"]))
    if how == "trailing comma" and meta:
        meta_text = meta_text[:-1] + ",}"
    elif how == "missing comma" and len(meta) > 1:
        meta_text = meta_text.replace(", ", " ", 1)
    elif how == "number":
        meta_text = '{"n": 1}'
    elif how == "raw control":
        meta_text = '{"a": "b\x01c"}'
    elif how == "bad escape":
        meta_text = '{"a": "b\\qc"}'
    n = draw(st.integers(0, 3))
    entries = [f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
               for i in range(n)]
    ws = [draw(_WS) for _ in range(5)]
    meta_member = f'"__metadata__"{ws[0]}:{ws[1]}{meta_text}'
    members = [meta_member, *entries]
    if how == "not first" and entries:
        members = [entries[0], meta_member, *entries[1:]]
    if how == "second later":
        members.append('"__metadata__":{"x":"y"}')
    if how == "no entries":
        members = [meta_member, ""]  # a trailing comma
    text = "{" + ws[2] + f"{ws[3]},{ws[4]}".join(members) + "}"
    return text.encode(), 4 * n


def _parse_outcome(header: bytes, data_len: int) -> Any:
    from app.errors import OptserveError
    from app.wire import safetensors_header

    safetensors_header.forget_headers()
    try:
        layout, metadata = safetensors_header._parse_header(header, data_len, "body")
    except OptserveError as exc:
        return ("error", type(exc).__name__, exc.code, exc.field, str(exc))
    return ("ok", layout.spans, list(layout.entries.items()), layout.plan, metadata)


@settings(max_examples=400, deadline=None)
@given(headers_with_metadata())
def test_a_header_split_at_its_metadata_parses_as_the_whole(case: tuple[bytes, int]) -> None:
    """A header that opens with its ``__metadata__`` is split there without parsing the
    entries (a client sending new metadata each step then sends the same entries, kept
    checked). Split or parsed whole, every header gives the same entries and metadata, or the
    same error."""
    from app.wire import safetensors_header

    header, data_len = case
    split = _parse_outcome(header, data_len)
    real = safetensors_header._metadata_first
    safetensors_header._metadata_first = lambda header: None  # type: ignore[assignment]
    try:
        whole = _parse_outcome(header, data_len)
    finally:
        safetensors_header._metadata_first = real  # type: ignore[assignment]
        safetensors_header.forget_headers()
    assert split == whole


def test_a_header_opening_with_metadata_is_split_there() -> None:
    from app.wire import safetensors_header

    buf = safetensors.torch.save({"w": torch.ones(2)}, {"scalars": '{"loss": 0.5}'})
    header = buf[8:8 + int.from_bytes(buf[:8], "little")]
    found = safetensors_header._metadata_first(header)
    assert found is not None and found[0] == {"scalars": '{"loss": 0.5}'}
    assert json.loads(found[1]) == {k: v for k, v in json.loads(header).items()
                                    if k != "__metadata__"}


@pytest.mark.parametrize("durability", ["memory", "step"])
def test_a_same_host_binding_hands_over_its_slots_as_a_known_layout(durability: str) -> None:
    """The same-host segment lays the gradient slots of one dtype end to end; every slot's
    gradients come as BodyTensors whose runs answer the non-finite check (names and norms, to
    the bit) as the search by data pointers does; a subset comes as a plain mapping."""
    import types

    from app.transport.local import Binding

    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float16, torch.float64]
    shapes: list[list[int]] = [[3], [0], [2, 2], [5], [1]]
    params = {f"p{i}": {"dtype": str(dtypes[i % 3]).removeprefix("torch."),
                        "shape": shapes[i % 5]} for i in range(12)}
    binding = Binding("s", types.SimpleNamespace(params=params, durability=durability))
    try:
        for slot in binding.grads.values():
            slot.copy_(torch.randn(slot.shape, generator=gen).to(slot.dtype))
        binding.grads["p3"].view(-1)[0] = math.nan
        body = binding.gradients(list(params))
        assert isinstance(body, BodyTensors) and body.header == binding.key and body.runs
        for kind in ("poisoned", "clean"):
            by_runs, by_pointers = TakenNorms(), TakenNorms()
            named = Session.nonfinite_names(body, by_runs)
            assert named == Session.nonfinite_names(dict(body), by_pointers)
            assert named == (["p3"] if kind == "poisoned" else [])
            assert norms_bits(by_runs) == norms_bits(by_pointers)
            binding.grads["p3"].view(-1)[0] = 1.0
            body = binding.gradients(list(params))
        # the slots of one dtype lie end to end
        by_dtype: dict[str, list[Any]] = {}
        for slot in binding.slots:
            by_dtype.setdefault(slot.dtype, []).append(slot)
        for slots in by_dtype.values():
            slots.sort(key=lambda slot: slot.grad)
            assert all(b.grad == a.grad + a.nbytes for a, b in zip(slots, slots[1:], strict=False))
        subset = binding.gradients(["p1", "p0"])
        assert not isinstance(subset, BodyTensors) and list(subset) == ["p1", "p0"]
        if durability == "step":  # a logged session's step sees its own copy
            before = body["p0"].clone()
            binding.grads["p0"].fill_(7.0)
            assert torch.equal(body["p0"], before)
    finally:
        binding.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", ["pairs without commas", "pairs and no end", "escapes",
                                   "whitespace", "spaces around commas", "braces"])
def test_a_hostile_header_is_split_or_refused_in_one_pass(shape: str) -> None:
    """Headers made to make a backtracking matcher take exponential time (an optional comma
    with whitespace on both sides once did, on "x":"y" "x":"y" ...) are read as the whole parse
    reads them, and promptly: this test fails by its timeout if the split backtracks."""
    from app.wire import safetensors_header

    head = b'{"__metadata__":'
    body = {
        "pairs without commas": b'{' + b'"a":"b" ' * 40 + b'x',  # (no end: no match)
        "pairs and no end": b'{' + b'"a":"b",' * 4000,
        "escapes": b'{"a":"' + b'\\"' * 20000,
        "whitespace": b' ' * 50000 + b'{}, "t":{}}',
        "spaces around commas": b'{' + b'"a":"b"   ,   ' * 3000 + b'"c":"d"   }   ,   "t":{}}',
        "braces": b'{' * 30000,
    }[shape]
    header = head + body
    split = _parse_outcome(header, 0)
    real = safetensors_header._metadata_first
    safetensors_header._metadata_first = lambda header: None  # type: ignore[assignment]
    try:
        whole = _parse_outcome(header, 0)
    finally:
        safetensors_header._metadata_first = real  # type: ignore[assignment]
        safetensors_header.forget_headers()
    assert split == whole
