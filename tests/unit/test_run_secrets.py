"""Credentials in a run spec: taken out before storing, put back for assignments."""

from __future__ import annotations

from common.proto.loadtest.v1 import run_pb2
from controller.domain.access.secrets import REDACTED, is_credential_header, restore_secrets, split_secrets


def target() -> run_pb2.Target:
    t = run_pb2.Target(base_url="http://127.0.0.1:8000/v1", model="m", api_key="sk-canary")
    t.headers.update(
        {
            "Authorization": "Bearer hdr-canary",
            "X-Api-Key": "k-canary",
            "Ocp-Apim-Subscription-Key": "sub-canary",
            "OpenAI-Organization": "team-a",
        }
    )
    return t


def test_split_leaves_no_credential_and_restore_puts_them_back() -> None:
    t = target()
    stored = split_secrets(t)
    assert t.api_key == ""
    assert dict(t.headers) == {
        "Authorization": REDACTED,
        "X-Api-Key": REDACTED,
        "Ocp-Apim-Subscription-Key": REDACTED,
        "OpenAI-Organization": "team-a",
    }
    assert "canary" not in t.SerializeToString().decode("latin-1")
    restore_secrets(t, stored)
    assert t == target()


def test_nothing_secret_stores_nothing() -> None:
    t = run_pb2.Target(base_url="http://h/v1", model="m")
    t.headers["Accept-Language"] = "de"
    assert split_secrets(t) == ""
    restore_secrets(t, "")
    assert t.api_key == "" and dict(t.headers) == {"Accept-Language": "de"}


def test_a_key_stored_before_headers_were_kept_apart_still_restores() -> None:
    t = run_pb2.Target()
    restore_secrets(t, "sk-plain")
    assert t.api_key == "sk-plain"


def test_every_header_is_secret_unless_it_is_on_the_harmless_list() -> None:
    for name in (
        "Authorization",
        "proxy-authorization",
        "Cookie",
        "X-API-Key",
        "api_key",
        "X-Auth-Token",
        "X-Secret",
        "Ocp-Apim-Subscription-Key",
        "X-Functions-Key",
        "X-Goog-Api-Key",
        "X-Org",
    ):
        assert is_credential_header(name), name
    for name in ("content-type", "User-Agent", "X-Request-Id", "OpenAI-Organization", "ACCEPT"):
        assert not is_credential_header(name), name
