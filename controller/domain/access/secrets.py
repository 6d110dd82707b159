"""The run's credentials for its target: kept out of the stored spec, given only to agents.

A run spec carries the target's API key and may carry credentials in extra headers. Which
header is a credential cannot be told from its name (`Ocp-Apim-Subscription-Key`,
`X-Functions-Key`, `X-Goog-Api-Key`, ... all are), so every header value is treated as a secret
unless its name is on `HARMLESS_HEADERS`, a short list of headers that never carry one.
`split_secrets` takes the secrets out of the spec before it is stored, leaving `[redacted]` as
the value of each secret header so readers still see which headers are sent. The removed
values are stored apart (`run_secrets`, erased when the run ends) and `restore_secrets` puts
them back into the target of an assignment.
"""

from __future__ import annotations

import json

from common.proto.loadtest.v1 import run_pb2

REDACTED = "[redacted]"

# The headers whose values are shown as given (compared case-insensitively): content
# negotiation, caching, tracing and API-version headers. docs/security.md lists them; keep it short.
HARMLESS_HEADERS = frozenset(
    name.lower()
    for name in (
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Cache-Control",
        "Content-Type",
        "User-Agent",
        "X-Request-Id",
        "OpenAI-Organization",
        "OpenAI-Project",
        "OpenAI-Beta",
        "Anthropic-Version",
        "Anthropic-Beta",
    )
)


def is_credential_header(name: str) -> bool:
    """Whether a header's value is treated as a secret: every header not on HARMLESS_HEADERS."""
    return name.lower() not in HARMLESS_HEADERS


def split_secrets(target: run_pb2.Target) -> str:
    """Remove the API key and credential header values from `target`; return them encoded
    ("" when there is nothing secret)."""
    headers = {name: value for name, value in target.headers.items() if is_credential_header(name)}
    for name in headers:
        target.headers[name] = REDACTED
    secret = {"api_key": target.api_key, "headers": headers}
    target.api_key = ""
    return json.dumps(secret, separators=(",", ":")) if secret["api_key"] or headers else ""


def restore_secrets(target: run_pb2.Target, stored: str) -> None:
    """Put the values `split_secrets` removed back into `target` (an assignment's copy)."""
    if not stored:
        return
    try:
        secret = json.loads(stored)
    except ValueError:
        secret = None
    if not isinstance(secret, dict):
        # Stored before credential headers were kept apart: the API key alone.
        target.api_key = stored
        return
    target.api_key = str(secret.get("api_key", ""))
    for name, value in dict(secret.get("headers", {})).items():
        target.headers[str(name)] = str(value)
