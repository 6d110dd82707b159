"""Credentials that do not belong in a target's base URL.

A base URL is stored with the run and shown by every read (GetRun, ListRuns, WatchRun, the
HTML report), so it must not carry a secret: neither userinfo (`http://user:pass@host/v1`)
nor a query string (`?key=...`; the agents append `/chat/completions` to the base URL, so a
query never worked as one anyway) nor a fragment. The controller refuses such a URL at
CreateRun and `llm-loadtest run` refuses it before sending; both use this one check. The
message never repeats the URL, which would repeat the secret.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_WHERE_KEYS_GO = (
    "give the key with --target-api-key / LLM_LOADTEST_TARGET_API_KEY (spec.target.api_key) "
    "or as a header with --header NAME:VALUE (spec.target.headers)"
)


def credential_problem(url: str) -> str | None:
    """Why `url` cannot be a base URL because of a credential in it, or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None  # not a URL at all: the URL checks say so
    if "@" in parts.netloc:
        return f"must not contain credentials (user:password@host): {_WHERE_KEYS_GO}"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return f"must not contain a query string or fragment (?key=...): {_WHERE_KEYS_GO}"
    return None
