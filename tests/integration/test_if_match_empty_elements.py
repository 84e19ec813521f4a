"""Empty elements of an ``If-Match`` list (RFC 9110 5.6.1.2: a recipient parses and ignores
them): ``"4",,"5"``, a leading or trailing comma, a header line left empty beside another.
They were a 422 ``invalid_base_version`` on every strict precondition and read, while
``If-None-Match`` ignored them. Now the list's versions count as without them: a change at one
of them applies as torch applies it, a list of versions the session has left is a 412 naming
them, and a header of empty elements only (``,``) names no version: a 422 naming
``If-Match``, with nothing done. Compared with the conditional-change tests' in-process
``torch.optim`` twin, bit for bit. Also: ``?base_version=5`` with a list naming 5 alone
(``"5", "5"``) applies, and an ``Idempotency-Key``'s fingerprint counts every ``If-Match``
line (it counted the first)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.integration.test_conditional_changes import CHANGES, Pair
from tests.integration.test_conditional_rfc9110 import refused_at

pytestmark = pytest.mark.integration


def with_lines(request: dict[str, Any], *lines: str) -> dict[str, Any]:
    """``request`` with ``If-Match`` on each of ``lines`` (one header line each)."""
    return {**request, "headers": [*request.get("headers", {}).items(),
                                   *(("If-Match", line) for line in lines)]}


@pytest.mark.parametrize("shards", [1, 2])
def test_empty_list_elements_are_ignored(http: httpx.Client, shards: int) -> None:
    request, mirror = CHANGES["scheduler_step"]
    pair = Pair(http, shards)
    pair.step()
    pair.step()
    for lines in (lambda tag: ('"0",,' + tag,), lambda tag: (f",{tag}",),
                  lambda tag: (f"{tag},,",), lambda tag: (f'"1", ,{tag}', ""),
                  lambda tag: ("", tag), lambda tag: (f", W/{tag},", f'{tag} , ,')):
        etag, revision = pair.read()
        done = http.request(**with_lines(request(pair), *lines(etag)))
        assert done.status_code == 200, (lines(etag), done.text)
        mirror(pair)
        pair.same_as_torch()
        assert pair.read()[1] == revision + 1
        r = http.get(f"{pair.url}/params", headers=[("If-Match", f",{etag},")])
        assert (r.status_code, r.headers["etag"]) == (200, etag), r.text
        pair.same_params(r.json()["params"])
    pair.step()
    etag, revision = pair.read()
    problem = refused_at(http.request(**with_lines(request(pair), '"0",,"1",')), etag,
                         revision)
    assert problem["base_versions"] == [0, 1]
    assert pair.read() == (etag, revision)
    pair.same_as_torch()


def test_a_list_of_empty_elements_only_names_no_version(http: httpx.Client) -> None:
    request, _ = CHANGES["patch_group"]
    pair = Pair(http, 1)
    pair.step()
    etag, revision = pair.read()
    for lines in ((",",), (", ,",), ("", "")):
        for sent in (request(pair), {"method": "GET", "url": f"{pair.url}/params"}):
            r = http.request(**with_lines(sent, *lines))
            assert r.status_code == 422, (lines, r.text)
            assert (r.json()["code"], r.json()["field"]) == ("invalid_base_version",
                                                             "If-Match"), r.text
    assert pair.read() == (etag, revision)
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


def test_a_query_version_agrees_with_a_list_naming_it_alone(http: httpx.Client) -> None:
    """``?base_version=5`` with ``If-Match: "5", "5"`` (or ``"5",``): both name version 5
    alone, so the change applies as torch applies it (a 422 ``invalid_base_version`` said
    they disagree); with another version in the list it is still a 422 naming
    ``base_version``, with nothing done."""
    request, mirror = CHANGES["patch_group"]
    pair = Pair(http, 1)
    pair.step()
    etag, revision = pair.read()
    version = int(etag.strip('"'))
    r = http.request(**with_lines({**request(pair), "params": {"base_version": version}},
                                  f'{etag}, "{version - 1}"'))
    assert r.status_code == 422 and r.json()["field"] == "base_version", r.text
    assert pair.read() == (etag, revision)
    pair.same_as_torch()
    for lines in ((f"{etag}, {etag}",), (f"{etag},", etag)):
        done = http.request(**with_lines({**request(pair), "params": {"base_version": version}},
                                         *lines))
        assert done.status_code == 200, (lines, done.text)
    mirror(pair)
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


def test_a_keyed_retry_counts_every_if_match_line(http: httpx.Client) -> None:
    """An ``Idempotency-Key`` fingerprints the whole ``If-Match`` list, its lines combined: a
    retry with the same lines (or the same list on one line) is answered as the first was;
    one whose second line names another version is another request, a 422
    ``idempotency_key_reused`` with nothing done (only the first line counted: it was
    answered as a replay)."""
    request, mirror = CHANGES["patch_group"]
    pair = Pair(http, 1)
    pair.step()
    etag, _ = pair.read()
    keyed = {**request(pair), "headers": {"Idempotency-Key": uuid.uuid4().hex}}
    done = http.request(**with_lines(keyed, etag, '"0"'))
    assert done.status_code == 200, done.text
    mirror(pair)
    pair.same_as_torch()
    after = pair.read()
    for lines in ((etag, '"0"'), (f'{etag}, "0"',)):
        again = http.request(**with_lines(keyed, *lines))
        assert again.status_code == 200, (lines, again.text)
        assert again.headers["idempotent-replayed"] == "true"
    other = http.request(**with_lines(keyed, etag, '"9"'))
    assert other.status_code == 422, other.text
    assert other.json()["code"] == "idempotency_key_reused", other.text
    assert pair.read() == after
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


def test_a_no_break_space_is_no_list_whitespace(http: httpx.Client) -> None:
    """Only SP and HTAB surround a list member (RFC 9110 OWS): ``*`` or a tag beside a
    no-break space (``\\xa0``, obs-text as the header's latin-1 reads it) is no condition the
    server reads. It was stripped as whitespace: ``If-Match: *\\xa0`` applied a change as
    ``*``, a step's ``If-Match: "<current>"\\xa0`` stepped, ``If-None-Match: *\\xa0`` was a
    304. Now a 422 naming ``If-Match`` with nothing done, and for ``If-None-Match`` a 422
    naming it (no entity tag: RFC 9110's grammar; it was ignored, the parameters answered)."""
    request, _ = CHANGES["patch_group"]
    pair = Pair(http, 1)
    pair.step()
    etag, revision = pair.read()
    nbsp = b"\xa0"
    step = {"method": "POST", "url": f"{pair.url}/step", "json": {"grads": {
        n: {"dtype": "float32", "shape": list(p.shape), "data": [0.5] * p.numel()}
        for n, p in pair.named().items()}}}
    for sent, tag in ((request(pair), b"*" + nbsp), (request(pair), etag.encode() + nbsp),
                      (step, etag.encode() + nbsp), (step, nbsp + etag.encode())):
        r = http.request(**{**sent, "headers": {b"If-Match": tag}})
        assert r.status_code == 422, (tag, r.text)
        assert (r.json()["code"], r.json()["field"]) == ("invalid_base_version", "If-Match")
    assert pair.read() == (etag, revision)
    pair.same_as_torch()
    r = http.get(f"{pair.url}/params", headers={b"If-None-Match": b"*" + nbsp})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_precondition", "If-None-Match")
    pair.step()
    pair.same_as_torch()
