"""API keys with roles: issuing, verifying, revoking, and ending the streams of revoked keys.

A key is `llt_<key id>_<secret>`: self-identifying, so verification looks the key up by
its id and compares SHA-256 digests of the secret in constant time. The database keeps the
digest, never the secret; the whole key is shown once, when it is created.

The bootstrap key (`LLM_LOADTEST_API_KEY`) is an admin key that lives only in the
controller's configuration; it appears in audit rows as the key id `bootstrap`.

A controller with no bootstrap key and no key ever created runs open (a local tool);
creating the first key closes it for good (revoking every key does not reopen it).

Long-lived streams (AgentService.Connect) register their key with `watch`; a key revoked
here, or revoked or expired in the database by another process (`llm-loadtest keys revoke
--db`), trips the stream's event within `WATCH_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from controller.domain.errors import FieldViolation, InvalidArgument, NotFound
from controller.store.interface import ApiKeyStore
from controller.store.security import KeyRecord

log = structlog.get_logger(__name__)

KEY_PREFIX = "llt_"
BOOTSTRAP_KEY_ID = "bootstrap"
WATCH_INTERVAL_S = 1.0
OPEN_RECHECK_S = 1.0
MAX_NAME_CHARS = 128
MAX_TTL_S = 10 * 365 * 24 * 3600
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_MAX_SECRET_CHARS = 256


class Role(enum.StrEnum):
    """What a key may do (see the role table in controller/auth.py)."""

    ADMIN = "admin"
    AGENT = "agent"
    READER = "reader"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key id (or `bootstrap`, or empty on an open controller) and its role."""

    key_id: str
    role: Role


class InvalidCredentials(Exception):
    """The presented key is malformed, unknown, revoked or expired. The message never
    contains the key (at most its id)."""


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def new_token() -> tuple[str, str]:
    """A fresh `(key_id, token)`; the token is `llt_<key_id>_<secret>`."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> tuple[str, str] | None:
    """`(key_id, secret)` of a well-formed key, else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not _KEY_ID.match(key_id) or not 0 < len(secret) <= _MAX_SECRET_CHARS:
        return None
    return key_id, secret


def key_id_of(token: str) -> str:
    """The key id of a presented token for logs and audit rows; never any part of a secret."""
    parsed = parse_token(token)
    return parsed[0] if parsed else ""


class KeyStore:
    """The controller's keys: verification, management and revocation of open streams."""

    def __init__(
        self, store: ApiKeyStore, bootstrap_key: str | None = None, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self._store = store
        self._bootstrap = digest(bootstrap_key) if bootstrap_key else None
        self._clock = clock
        self._closed = self._bootstrap is not None  # once closed, never open again
        self._open_checked = -OPEN_RECHECK_S
        self._streams: dict[str, set[asyncio.Event]] = {}
        self._watcher: asyncio.Task[None] | None = None

    # --- verification ----------------------------------------------------------------

    async def auth_enabled(self) -> bool:
        """False while the controller runs open (no bootstrap key, no key ever created)."""
        if self._closed:
            return True
        now = time.monotonic()
        if now - self._open_checked >= OPEN_RECHECK_S:
            self._open_checked = now
            self._closed = await self._store.any_keys()
        return self._closed

    async def authenticate(self, token: str) -> Principal:
        """The principal of a presented key, or InvalidCredentials."""
        if self._bootstrap is not None and hmac.compare_digest(digest(token), self._bootstrap):
            return Principal(BOOTSTRAP_KEY_ID, Role.ADMIN)
        parsed = parse_token(token)
        if parsed is None:
            if self._bootstrap is not None:  # the caller may have meant the bootstrap key, of any form
                raise InvalidCredentials(
                    "invalid API key: not the bootstrap key, nor a key of the form llt_<id>_<secret>"
                )
            raise InvalidCredentials("malformed API key (expected llt_<id>_<secret>)")
        key_id, secret = parsed
        record = await self._store.get_key(key_id)
        if record is None or not hmac.compare_digest(digest(secret), record.secret_sha256):
            raise InvalidCredentials(f"invalid API key (id {key_id})")
        if record.revoked_at is not None:
            raise InvalidCredentials(f"API key {key_id} was revoked")
        if not record.usable(self._clock()):
            raise InvalidCredentials(f"API key {key_id} has expired")
        return Principal(key_id, Role(record.role))

    # --- management ------------------------------------------------------------------

    async def create(self, name: str, role: Role | str, ttl_s: float | None = None) -> tuple[KeyRecord, str]:
        """Issue a key; returns its record and the whole key (shown to the caller once)."""
        violations = []
        if not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
            violations.append(FieldViolation("name", f"1-{MAX_NAME_CHARS} printable characters"))
        if role not in {r.value for r in Role}:
            violations.append(FieldViolation("role", "one of admin, agent, reader"))
        if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:  # also rejects NaN
            violations.append(FieldViolation("ttl", f"must be positive and at most {MAX_TTL_S} s"))
        if violations:
            raise InvalidArgument(violations)
        now = self._clock()
        expires = None if ttl_s is None else now + int(ttl_s * 1e9)
        return await self.issue(name, Role(role), expires, now)

    async def issue(
        self, name: str, role: Role, expires_at_ns: int | None, now_ns: int | None = None
    ) -> tuple[KeyRecord, str]:
        """Store a key as given (no validation; `create` validates user input)."""
        key_id, token = new_token()
        secret = token[len(KEY_PREFIX) + len(key_id) + 1 :]
        record = KeyRecord(key_id, digest(secret), role.value, name, now_ns or self._clock(), expires_at_ns, None)
        await self._store.insert_key(record)
        self._closed = True
        log.info("api_key_created", key_id=key_id, role=role.value, name=name)
        return record, token

    async def list(self, include_revoked: bool = False) -> list[KeyRecord]:
        return await self._store.list_keys(include_revoked)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key now and end the streams opened with it."""
        if not key_id:
            raise InvalidArgument([FieldViolation("key_id", "required")])
        record = await self._store.revoke_key(key_id, self._clock())
        if record is None:
            raise NotFound(f"API key {key_id!r} not found")
        log.info("api_key_revoked", key_id=key_id)
        self._trip(key_id)
        return record

    # --- open streams ----------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, key_id: str) -> Iterator[asyncio.Event]:
        """An event set when `key_id` is revoked or expires, for the life of a stream."""
        event = asyncio.Event()
        self._streams.setdefault(key_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._streams.get(key_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._streams[key_id]

    def _trip(self, key_id: str) -> None:
        for event in self._streams.get(key_id, ()):
            event.set()

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch_loop(), name="key-revocation-watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch_loop(self) -> None:
        """Notice keys revoked or expired behind our back (another process, the clock)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            ids = [k for k in self._streams if k != BOOTSTRAP_KEY_ID and k]
            if not ids:
                continue
            try:
                records = await self._store.get_keys(ids)
            except Exception:  # a failed poll must not end the watcher; the next one retries
                log.exception("key_watch_failed")
                continue
            now = self._clock()
            found = {r.key_id for r in records}
            for record in records:
                if not record.usable(now):
                    self._trip(record.key_id)
            for key_id in set(ids) - found:
                self._trip(key_id)
