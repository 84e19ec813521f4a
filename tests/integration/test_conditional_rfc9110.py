"""Conditional requests as RFC 9110 (section 13) reads them, against a real uvicorn server:

- ``If-Match`` on a strict precondition (every conditional change, and the reads that evaluate
  it) compares strongly: a weak tag (``W/"5"``) matches no version, so it is a 412
  ``precondition_failed`` with nothing done, even at the session's version; ``*`` holds
  whenever the session exists, and a list (``"4", "5"``) at any of its versions;
- ``If-None-Match: *`` on a read is false whenever the session exists: 304 Not Modified;
- a 412 carries the session's current version headers (``ETag``, ``X-Optserve-Version``,
  ``X-Optserve-Revision``), as a 200 would.

Whatever is applied or answered is compared with an in-process ``torch.optim`` twin (the
conditional-change tests' :class:`Pair`), bit for bit; whatever is refused leaves the twin's
state standing. Every test runs on both engines (:data:`~tests.conftest.ENGINES`: the Ray
one's hosts on the test cluster), sessions sharded and not: they answer alike, row pulls
included."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import ENGINES
from tests.integration.test_conditional_changes import CASES, CHANGES, Pair
from tests.integration.test_conditional_import import Pair as ReadPair
from tests.integration.test_conditional_import import wire
from tests.integration.test_conditional_reads import READS, answered_as_torch, read

pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine_url", ENGINES, indirect=True)]


def version_headers_are(r: httpx.Response, etag: str, revision: int | None) -> None:
    """``r`` carries the session's current version (and revision) headers, as a 200 would."""
    assert r.headers["etag"] == etag, r.headers
    assert r.headers["x-optserve-version"] == etag.strip('"')
    if revision is not None:
        assert r.headers["x-optserve-revision"] == str(revision)


def refused_at(r: httpx.Response, etag: str, revision: int | None) -> dict[str, Any]:
    assert r.status_code == 412, r.text
    problem: dict[str, Any] = r.json()
    assert (problem["code"], problem["field"]) == ("precondition_failed", "If-Match")
    assert f'"{problem["current_version"]}"' == etag
    version_headers_are(r, etag, revision)
    return problem


def read_at(pair: ReadPair) -> tuple[str, int]:
    """The ETag and revision the session's description is read at."""
    r = pair.http.get(pair.url)
    assert r.status_code == 200, r.text
    return r.headers["etag"], int(r.headers["x-optserve-revision"])


def with_match(request: dict[str, Any], tag: str, key: str | None = None) -> dict[str, Any]:
    headers = {**request.get("headers", {}), "If-Match": tag}
    if key is not None:
        headers["Idempotency-Key"] = key
    return {**request, "headers": headers}


@pytest.mark.parametrize(("name", "shards"), CASES)
def test_a_weak_if_match_never_holds_and_star_holds_whenever_the_session_exists(
        http: httpx.Client, name: str, shards: int) -> None:
    """``W/"<current>"`` (alone, or with a stale strong tag): 412 with the current version
    headers, nothing done; ``*``: applied as torch applies it; a bare version as its tag."""
    request, mirror = CHANGES[name]
    pair = Pair(http, shards)
    pair.step()
    etag, revision = pair.read()
    for tag in (f"W/{etag}", f'W/{etag}, "0"', f'"0",W/{etag}'):
        refused_at(http.request(**with_match(request(pair), tag)), etag, revision)
        assert pair.read() == (etag, revision)
        pair.same_as_torch()
    done = http.request(**with_match(request(pair), "*", uuid.uuid4().hex))
    assert done.status_code in (200, 201), done.text
    mirror(pair)
    pair.same_as_torch()
    assert pair.read()[1] == revision + 1
    pair.step()
    pair.same_as_torch()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_list_holds_at_any_of_its_versions(http: httpx.Client, shards: int) -> None:
    """``If-Match: "<old>", "<current>"`` applies (a scheduler step, an overwrite), a list of
    versions the session has left is a 412 naming them all; a bare version is taken as its
    tag. A delete takes lists and ``*`` too."""
    request, mirror = CHANGES["scheduler_step"]
    pair = Pair(http, shards)
    pair.step()
    pair.step()
    etag, revision = pair.read()
    problem = refused_at(http.request(**with_match(request(pair), '"0", "1"')), etag, revision)
    assert problem["base_versions"] == [0, 1] and problem["base_versions_count"] == 2
    # a long list: the first 16 versions named, in the order sent, and how many (not all
    # 5,000 echoed); the versions of the session's past named twice count once
    tags = ", ".join(f'"{v}"' for v in [1, 0, 1, *range(100, 5098)])
    problem = refused_at(http.request(**with_match(request(pair), tags)), etag, revision)
    assert problem["base_versions"] == [1, 0, *range(100, 114)]
    assert problem["base_versions_count"] == 5000
    assert "and 4984 more" in problem["detail"] and len(problem["detail"]) < 300
    pair.same_as_torch()
    for tag in (f'"1", {etag}', f'{etag} , "7"', etag.strip('"')):
        done = http.request(**with_match(request(pair), tag))
        assert done.status_code == 200, done.text
        mirror(pair)
        pair.same_as_torch()
    put, put_mirror = CHANGES["put_params"]
    done = http.request(**with_match(put(pair), f'"0", {etag}'))
    assert done.status_code == 200, done.text
    put_mirror(pair)
    pair.same_as_torch()
    etag, revision = pair.read()
    refused_at(http.request(**with_match({"method": "DELETE", "url": pair.url}, '"0", "1"')),
               etag, revision)
    pair.same_as_torch()
    r = http.request(**with_match({"method": "DELETE", "url": pair.url}, "*"))
    assert r.status_code == 204, r.text
    assert http.get(pair.url).status_code == 404


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("what", READS)
def test_a_read_compares_if_match_strongly_and_takes_lists_and_star(
        http: httpx.Client, what: str, shards: int) -> None:
    """A read answers as torch for ``*``, a list naming its version and a bare version; a
    weak tag of its version, or a list of others, is a 412 with the version headers. A read
    takes no ``?base_revision=`` (nor ``?base_version=``): a 422 naming it, sharded or not."""
    pair = ReadPair(http, shards)
    pair.step()
    pair.step()
    if what in ("session", "params", "state_dict"):
        for query in ("base_revision", "base_version"):
            url = pair.url + {"session": "", "params": "/params",
                              "state_dict": "/state_dict"}[what]
            r = http.get(url, params={query: 2})
            assert r.status_code == 422, r.text
            assert (r.json()["code"], r.json()["field"]) == ("invalid_query", query)
    for tag in ("*", '"1", "2"', '"2",W/"1"', "2"):
        answered_as_torch(pair, what, read(pair, what, {"If-Match": tag}))
    for tag in ('W/"2"', 'W/"2", "1"', '"0", "1"'):
        refused_at(read(pair, what, {"If-Match": tag}), '"2"',
                   2 if what in ("session", "state_dict", "state_dict binary") else None)


@pytest.mark.parametrize("shards", [1, 2])
def test_if_none_match_star_is_a_304_on_every_versioned_read(
        http: httpx.Client, shards: int) -> None:
    """``If-None-Match: *``: 304 with the version headers and no body on a pull (whole,
    rows, HEAD, with a long poll's ``wait_s``: at once), and on the session's description
    and state dict (with the revision); after a false ``If-Match``, the 412. A version tag
    is still ignored on the description (its ETag is the parameters' version)."""
    pair = ReadPair(http, shards)
    pair.step()
    etag, revision = read_at(pair)
    star = {"If-None-Match": "*"}
    for what in READS:
        r = read(pair, what, star)
        assert r.status_code == 304, (what, r.text)
        assert r.content == b""
        version_headers_are(r, etag, revision if what in ("session", "state_dict",
                                                          "state_dict binary") else None)
        refused_at(read(pair, what, {**star, "If-Match": '"0"'}), etag,
                   revision if what.startswith(("session", "state_dict")) else None)
        r = read(pair, what, {**star, "If-Match": etag})
        assert r.status_code == 304, (what, r.text)
    r = http.head(f"{pair.url}/params", headers=star)
    assert r.status_code == 304 and r.headers["etag"] == etag
    began = time.monotonic()
    r = http.get(f"{pair.url}/params", params={"wait_s": 20}, headers=star)
    assert r.status_code == 304 and time.monotonic() - began < 10
    assert http.get("/v1/sessions/no-such-session/params", headers=star).status_code == 404
    answered_as_torch(pair, "session", read(pair, "session", {"If-None-Match": etag}))
    answered_as_torch(pair, "params", read(pair, "params", {"If-None-Match": 'W/"0"'}))
    assert read_at(pair) == (etag, revision)
    pair.same_as_torch()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_patch_that_changes_nothing_keeps_the_revision(http: httpx.Client,
                                                         shards: int) -> None:
    """``PATCH`` of the session or of a group with ``{}``, or with the values they hold: 200
    with the current description, revision and version unchanged (a conditional change
    naming the revision still applies); a keyed one repeated is answered the same. A PATCH
    that changes something is one revision; the session steps as torch all along."""
    pair = Pair(http, shards)
    pair.step()
    etag, revision = pair.read()
    described = http.get(pair.url).json()
    lr = described["lr"][0]
    key = uuid.uuid4().hex
    for url, body in ((pair.url, {}), (f"{pair.url}/param_groups/0", {}),
                      (f"{pair.url}/param_groups/0", {"lr": lr}),
                      (pair.url, {"max_staleness": None, "metrics": described["metrics"]})):
        r = http.patch(url, json=body)
        assert r.status_code == 200, (url, body, r.text)
        assert r.json() == described, (url, body)
        version_headers_are(r, etag, revision)
        assert pair.read() == (etag, revision)
    first = http.patch(pair.url, json={}, headers={"Idempotency-Key": key})
    again = http.patch(pair.url, json={}, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert first.json() == described
    assert again.json() == {**described, "replayed": True}
    assert again.headers.get("idempotent-replayed") == "true"
    r = http.patch(pair.url, json={"max_staleness": 3})  # (a change: one revision)
    assert r.status_code == 200 and r.json()["revision"] == revision + 1
    pair.max_staleness = 3
    r = http.patch(pair.url, json={"max_staleness": 3})
    assert r.status_code == 200 and r.json()["revision"] == revision + 1
    r = http.patch(f"{pair.url}/param_groups/0", json={"lr": 0.02},
                   params={"base_revision": revision + 1})
    assert r.status_code == 200 and r.json()["revision"] == revision + 2
    CHANGES["patch_group"][1](pair)
    assert pair.read() == (etag, revision + 2)
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


def steps_taken(pair: Pair) -> int:
    """The optimizer steps the twin's Adam took (its per-parameter ``step``)."""
    counts = {int(entry["step"]) for entry in pair.opt.state.values()}
    assert len(counts) == 1, counts
    return counts.pop()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_412_carries_the_step_count_a_200_does(http: httpx.Client, shards: int) -> None:
    """Every 412 (each conditional change, ``PUT .../state_dict`` and ``DELETE`` included,
    and each read evaluating ``If-Match``) carries ``X-Optserve-Step``, the session's step
    count: what a GET of the session answers in it and in ``step``, and the steps torch's
    twin took; not its version (an overwrite moved that past the step count), and beside the
    version headers. It had only ``ETag``, ``X-Optserve-Version`` and
    ``X-Optserve-Revision``. Nothing refused changes the session."""
    pair = Pair(http, shards)
    for _ in range(3):
        pair.step()
    put, put_mirror = CHANGES["put_params"]
    done = http.request(**put(pair))  # (version 4, step count 3)
    assert done.status_code == 200, done.text
    put_mirror(pair)
    got = http.get(pair.url)
    assert got.status_code == 200, got.text
    etag, revision, step = (got.headers["etag"], int(got.headers["x-optserve-revision"]),
                            got.headers["x-optserve-step"])
    assert step == str(got.json()["step"]) == str(steps_taken(pair)) == "3"
    assert etag == '"4"'
    changes = {name: change(pair) for name, (change, _) in CHANGES.items()
               if not (name == "add_group" and shards > 1)}
    changes["delete"] = {"method": "DELETE", "url": pair.url}
    changes["put_state_dict"] = {"method": "PUT", "url": f"{pair.url}/state_dict",
                                 "json": wire(pair.opt.state_dict())}
    for name, change in changes.items():
        for tag in ('"1"', '"0", "2"', 'W/"4"'):
            r = http.request(**with_match(change, tag))
            refused_at(r, etag, revision)
            assert r.headers.get("x-optserve-step") == step, (name, tag, r.headers)
        r = http.request(**{**change, "params": {"base_revision": revision - 1}})
        assert r.status_code == 412 and r.json()["field"] == "base_revision", (name, r.text)
        version_headers_are(r, etag, revision)
        assert r.headers.get("x-optserve-step") == step, (name, r.headers)
        assert r.json()["current_step"] == int(step)
    for what in READS:
        ok = read(pair, what, {})
        assert ok.status_code == 200 and ok.headers["x-optserve-step"] == step, (what, ok.text)
        r = read(pair, what, {"If-Match": '"3"'})
        refused_at(r, etag, revision if what.startswith(("session", "state_dict")) else None)
        assert r.headers.get("x-optserve-step") == step, (what, r.headers)
    assert pair.read() == (etag, revision)
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


#: ``If-None-Match`` values outside RFC 9110's grammar (``"*" / #entity-tag``): ``*`` in a
#: list, a lower-case weak indicator, a tag unquoted, unclosed, spaced from its ``W/``, two
#: tags without a comma, a quoted tag with a space in it, a no-break space beside ``*``
MALFORMED_NONE_MATCH = ('"2", *', '*, "2"', "*, *", 'w/"2"', 'w/"9"', "abc", '"2', 'W/ "2"',
                        '"1" "2"', '"a b"', "*\xa0")
#: (value, whether a pull of the session at version 2 is a 304): valid ones, taken as before
VALID_NONE_MATCH = (('W/"2"', True), ('"2"', True), ('"1", "2"', True), ("*", True),
                    ('"1",, W/"2" ,', True), ('"1" ,\t"2"', True), ("2", True),
                    ('"a,b", "2"', True),
                    ('"abc"', False), ('"abc", W/"1"', False), ('"1",', False),
                    ('"\xb2"', False), ('"99999999999999999999"', False),
                    # (no ETag the server gives: opaque tags compare character by character,
                    # so "02" is not "2"; they were a 304)
                    ('"02"', False), ('W/"02"', False), ('"1", "002"', False), ("02", False))


@pytest.mark.parametrize("shards", [1, 2])
def test_a_malformed_if_none_match_is_a_422_naming_it(
        http: httpx.Client, shards: int) -> None:
    """An ``If-None-Match`` outside RFC 9110's grammar (``*`` in a list, ``w/"2"``, ...) on
    every read that evaluates it is a 422 ``invalid_precondition`` naming it, as a malformed
    ``If-Match`` is a 422 (it was read as naming no version: a full answer, silently); its
    lines combine into one list (``"1"`` and ``*`` on two lines: ``*`` in a list). The valid
    forms answer as before: a version named, weak or strong, bare or in a list (empty
    elements ignored), is a 304 on a pull; ``*`` a 304 on every read; a tag that is no
    version (``"abc"``) is ignored; the description and the state dict evaluate ``*`` only.
    Nothing changes: the answers are torch's."""
    pair = ReadPair(http, shards)
    pair.step()
    pair.step()
    for what in READS:
        for value in MALFORMED_NONE_MATCH:
            r = read(pair, what, {"If-None-Match": value.encode("latin-1")})
            assert r.status_code == 422, (what, value, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert (r.json()["code"], r.json()["field"]) == (
                "invalid_precondition", "If-None-Match"), (what, value, r.text)
        for value, not_modified in VALID_NONE_MATCH:
            r = read(pair, what, {"If-None-Match": value.encode("latin-1")})
            pulled = what.startswith(("params", "rows"))
            if value == "*" or (not_modified and pulled):
                assert (r.status_code, r.content) == (304, b""), (what, value, r.text)
                assert r.headers["etag"] == '"2"'
            else:
                answered_as_torch(pair, what, r)
    for lines, status in (([("If-None-Match", '"1"'), ("If-None-Match", "*")], 422),
                          ([("If-None-Match", '"1"'), ("If-None-Match", 'W/"2"')], 304)):
        r = http.get(f"{pair.url}/params", params={"encoding": "b64"}, headers=lines)
        assert r.status_code == status, (lines, r.text)
    r = http.get(f"{pair.url}/params", params={"wait_s": 5}, headers={"If-None-Match": 'w/"2"'})
    assert r.status_code == 422, r.text  # (at once: refused before any wait)
    assert http.get("/v1/sessions/no-such-session/params",
                    headers={"If-None-Match": '"1", *'}).status_code == 422
    pair.same_as_torch()
