"""The run's credentials for its target: kept out of the stored spec, given only to agents.

A run spec carries the target's API key and may carry credentials in extra headers
(`Authorization`, `X-Api-Key`, cookies, ...). `split_secrets` takes them out of the spec
before it is stored, leaving `[redacted]` as the value of each credential header so readers
still see which headers are sent. The removed values are stored apart (`run_secrets`, erased
when the run ends) and `restore_secrets` puts them back into the target of an assignment.
"""

from __future__ import annotations

import json
import re

from common.proto.loadtest.v1 import run_pb2

REDACTED = "[redacted]"

# Header names whose values are credentials (case-insensitive).
_CREDENTIAL_HEADER = re.compile(r"authorization|cookie|api[-_]?key|token|secret|password|passwd|session|auth", re.I)


def is_credential_header(name: str) -> bool:
    """Whether a header's value is treated as a secret."""
    return bool(_CREDENTIAL_HEADER.search(name))


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
