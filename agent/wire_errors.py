"""Error text of a failed request or scrape, safe to store and show.

An error message ends up in samples, results and reports, which readers see. A destination
that is not an HTTP server (an SSH, SMTP or Redis port) answers with a banner, and aiohttp's
parse errors quote the bytes they choke on; repeating them would turn a run into a way to
read any port the agents reach. So a reply that does not parse as HTTP is described by the
kind of parse error only (`not an HTTP response (Bad status line)`), and every other message
is cut to `MAX_CHARS` printable characters.
"""

from __future__ import annotations

import re

import aiohttp

MAX_CHARS = 200
_KIND_CHARS = 40
_KIND = re.compile(r"[A-Za-z][A-Za-z ]*")


def printable(text: str, limit: int = MAX_CHARS) -> str:
    """`text` with whitespace collapsed, control characters replaced by `?`, cut to `limit`."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split())[:limit])


def transport_error(exc: BaseException, limit: int = MAX_CHARS) -> str:
    """`Type: message` of an exception raised while talking to a destination."""
    if isinstance(exc, aiohttp.ClientResponseError) and exc.status == 400 and not exc.history:
        # Raised by aiohttp's response parser (a real HTTP 400 is a response, not an
        # exception, since nothing here calls raise_for_status): say what failed, not the bytes.
        kind = _KIND.match(str(exc.message).strip())
        return f"not an HTTP response ({kind.group(0).strip()[:_KIND_CHARS] if kind else 'malformed'})"
    return printable(f"{type(exc).__name__}: {exc}", limit)
