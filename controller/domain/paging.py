"""Page tokens of the list RPCs (ListRuns, ListDatasets): an opaque encoding of the
(created_at, pk) cursor of the last row a page returned."""

from __future__ import annotations

import base64

from controller.domain.errors import FieldViolation, InvalidArgument


def encode_page_token(cursor: tuple[int, int]) -> str:
    """The token of the page after the row `cursor` = (created_at, pk)."""
    return base64.urlsafe_b64encode(f"{cursor[0]}:{cursor[1]}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[int, int]:
    """The cursor of a token (INVALID_ARGUMENT on `page_token` when it is not one of ours)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, pk = raw.split(":")
        return int(created), int(pk)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument([FieldViolation("page_token", "malformed page token")]) from exc
