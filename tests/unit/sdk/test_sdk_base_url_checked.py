"""A base URL without a scheme (``Client("127.0.0.1:8000")``) is refused when the client is
made, with a ValueError naming it: it failed only at the first request (httpx's
``UnsupportedProtocol``), far from the line that made the mistake."""

from __future__ import annotations

import pytest

import optserve


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "ftp://host/",
                                 "optserve", "http://"])
@pytest.mark.parametrize("make", [optserve.Client, optserve.AsyncClient])
def test_a_base_url_without_a_scheme_is_refused_at_once(url: str, make: type) -> None:
    with pytest.raises(ValueError, match="base_url") as info:
        make(url)
    assert repr(url) in str(info.value)


def test_the_environment_variable_is_named_when_it_is_the_bad_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_BASE_URL", "127.0.0.1:9")
    with pytest.raises(ValueError, match="OPTSERVE_BASE_URL.*'127.0.0.1:9'"):
        optserve.Client()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "HTTPS://h.example/prefix",
                                 "http://[::1]:8000"])
def test_http_urls_are_taken(url: str) -> None:
    with optserve.Client(url, transport="http") as c:
        assert c.base_url == url.rstrip("/")


def test_the_cli_names_its_url_option(capsys: pytest.CaptureFixture[str]) -> None:
    from optserve import cli
    assert cli.main(["--url", "127.0.0.1:9", "sessions", "ls"]) == cli.EXIT_USAGE
    assert "--url must be an absolute http:// or https:// URL" in capsys.readouterr().err


def test_the_cli_names_the_variable_a_bad_url_came_from(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad ``OPTSERVE_BASE_URL`` is named as such (the usage error said ``--url``, an option
    not given); ``--url`` given still wins, and is named."""
    from optserve import cli
    monkeypatch.setenv("OPTSERVE_BASE_URL", "127.0.0.1:9")
    assert cli.main(["sessions", "ls"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "OPTSERVE_BASE_URL must be an absolute http:// or https:// URL" in err
    assert "--url must" not in err
    assert cli.main(["--url", "localhost:9", "sessions", "ls"]) == cli.EXIT_USAGE
    assert "--url must be an absolute" in capsys.readouterr().err
