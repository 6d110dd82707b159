"""The checks on where a run's traffic goes: credentials in the base URL, `--allow-target`
entries, loopback listen addresses, and the error text of replies that are not HTTP."""

from __future__ import annotations

import aiohttp
import pytest

from agent.wire_errors import printable, transport_error
from common.target_url import credential_problem
from controller.domain.access.destinations import is_loopback_listen, parse_allow_entry
from controller.domain.errors import InvalidArgument
from controller.domain.spec import validate_and_default
from tests.unit.test_spec_validation import spec

pytestmark = pytest.mark.timeout(10)


IN_URL = [
    "http://u:SECRET@h/v1",
    "http://SECRET@h/v1",
    "http://:SECRET@h/v1",
    "http://h/v1?key=SECRET",
    "http://h/v1?",
    "http://h/v1#SECRET",
]


@pytest.mark.parametrize("url", IN_URL)
def test_credentials_in_the_base_url_are_refused_without_repeating_them(url: str) -> None:
    s = spec()
    s.target.base_url = url
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(s)
    [violation] = info.value.violations
    assert violation.field == "spec.target.base_url"
    assert "--target-api-key" in violation.description and "SECRET" not in violation.description


@pytest.mark.parametrize("url", ["http://h:8000/v1", "https://h/v1/", "http://[::1]:8000/v1", "http://h/a@b/v1"])
def test_plain_base_urls_pass(url: str) -> None:
    assert credential_problem(url) is None


def test_allow_entries() -> None:
    assert str(parse_allow_entry("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parse_allow_entry("10.1.2.3")) == "10.1.2.3/32"
    assert str(parse_allow_entry("10.1.2.3/8")) == "10.0.0.0/8"  # host bits dropped
    assert parse_allow_entry("*.Internal.") == "*.internal"
    for bad in ("", "10.0.0.0/33", "host:80", "http://x", "a b"):
        with pytest.raises(ValueError):
            parse_allow_entry(bad)


def test_loopback_listen_addresses() -> None:
    for listen in ("127.0.0.1:50051", "127.9.9.9:1", "[::1]:50051", "localhost:50051", "unix:/tmp/c.sock"):
        assert is_loopback_listen(listen), listen
    for listen in ("0.0.0.0:50051", "[::]:50051", ":50051", "10.0.0.5:50051", "192.0.2.1:1"):
        assert not is_loopback_listen(listen), listen


def test_a_parse_error_of_a_non_http_reply_keeps_none_of_its_bytes() -> None:
    exc = aiohttp.ClientResponseError(
        aiohttp.RequestInfo(aiohttp.client.URL("http://h/"), "GET", {}),  # type: ignore[arg-type]
        (),
        status=400,
        message="Bad status line:\n  b'SSH-2.0-OpenSSH_9.6 CANARY'",
    )
    assert transport_error(exc) == "not an HTTP response (Bad status line)"
    assert printable("a\x00b\n\nc" + "x" * 300) == "a?b c" + "x" * 195
