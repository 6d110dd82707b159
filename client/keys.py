"""`llm-loadtest keys create|list|revoke` and `llm-loadtest audit`.

Both work on a running controller through its admin-only KeyService (connection flags,
an admin key), or with `--db FILE` directly on the controller's SQLite database (for
bootstrapping the first keys; a running controller notices new and revoked keys within a
second). A new key's secret is printed once, alone on stdout, so that
`KEY=$(llm-loadtest keys create --role agent --name edge-1)` captures exactly the key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from client import render
from client.commands import add_connection_arguments, open_client
from common.durations import parse_duration
from common.proto.loadtest.v1 import key_service_pb2

if TYPE_CHECKING:
    from controller.local import KeyRecord, LocalKeyAdmin

ROLES = ("admin", "agent", "reader")
_ROLE_ENUM = {
    "admin": key_service_pb2.KEY_ROLE_ADMIN,
    "agent": key_service_pb2.KEY_ROLE_AGENT,
    "reader": key_service_pb2.KEY_ROLE_READER,
}


@dataclass(frozen=True)
class KeyRow:
    """A key as the commands print it (from either source)."""

    key_id: str
    name: str
    role: str
    created_ns: int
    expires_ns: int | None
    revoked_ns: int | None


@dataclass(frozen=True)
class AuditRow:
    """An audit event as the commands print it."""

    time_ns: int
    key_id: str
    method: str
    run_id: str
    outcome: str
    request_id: str
    peer: str
    detail: str
    count: int  # calls the row stands for (refusals are aggregated per address and minute)


def _add_source(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--db", default=None, metavar="FILE", help="work on this controller database directly")
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = sub.add_parser("create", help="create a key and print it (once)")
    _add_source(p)
    p.add_argument("--role", required=True, choices=ROLES, help="admin, agent (Connect only) or reader")
    p.add_argument("--name", required=True, help="a name for people, e.g. edge-1")
    p.add_argument("--expires", default=None, metavar="DURATION", help="lifetime, e.g. 30d, 12h (default: never)")
    p = sub.add_parser("list", help="list keys (never their secrets)")
    _add_source(p)
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p = sub.add_parser("revoke", help="revoke a key; its open streams end within seconds")
    _add_source(p)
    p.add_argument("key_id", metavar="ID", help="key id (the <id> of llt_<id>_<secret>)")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_source(parser)
    parser.add_argument("--key-id", default="", help="only events of this key id")
    parser.add_argument("--run-id", default="", help="only events about this run")
    parser.add_argument("--limit", type=int, default=50, help="at most this many events, newest first")


def parse_expires(text: str | None) -> float | None:
    """`30d` -> seconds (days are allowed here on top of common durations)."""
    if text is None:
        return None
    text = text.strip()
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        seconds = float(text[:-1]) * 86400
    else:
        seconds = parse_duration(text)
    if not seconds > 0:
        raise ValueError(f"--expires must be positive, got {text!r}")
    return seconds


def _iso(ns: int | None) -> str:
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ts_ns(message: key_service_pb2.ApiKey | key_service_pb2.AuditEvent, field: str) -> int | None:
    return int(getattr(message, field).ToNanoseconds()) if message.HasField(field) else None  # type: ignore[arg-type]


def _key_from_proto(k: key_service_pb2.ApiKey) -> KeyRow:
    role = next((name for name, value in _ROLE_ENUM.items() if value == k.role), "unspecified")
    return KeyRow(k.id, k.name, role, _ts_ns(k, "create_time") or 0, _ts_ns(k, "expire_time"), _ts_ns(k, "revoke_time"))


def _print_keys(rows: list[KeyRow], as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": r.key_id,
                        "name": r.name,
                        "role": r.role,
                        "created": _iso(r.created_ns),
                        "expires": _iso(r.expires_ns) if r.expires_ns else None,
                        "revoked": _iso(r.revoked_ns) if r.revoked_ns else None,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    now = time.time_ns()
    print(f"{'ID':<14}{'ROLE':<8}{'NAME':<24}{'CREATED':<22}{'EXPIRES':<22}STATE")
    for r in rows:
        state = "revoked" if r.revoked_ns else ("expired" if r.expires_ns and r.expires_ns <= now else "active")
        print(f"{r.key_id:<14}{r.role:<8}{r.name[:23]:<24}{_iso(r.created_ns):<22}{_iso(r.expires_ns):<22}{state}")


def _print_audit(rows: list[AuditRow], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{**r.__dict__, "time": _iso(r.time_ns)} for r in rows], indent=2))
        return
    print(f"{'TIME':<22}{'KEY':<14}{'OUTCOME':<20}{'COUNT':>7}  {'METHOD':<40}{'RUN':<26}{'PEER':<24}DETAIL")
    for r in rows:
        method = r.method.rsplit("/", 1)[-1] if r.method.startswith("/loadtest.") else r.method
        print(
            f"{_iso(r.time_ns):<22}{r.key_id or '-':<14}{r.outcome:<20}{r.count:>7}  {method:<40}"
            f"{r.run_id or '-':<26}{r.peer:<24}{r.detail}"
        )


async def _on_db(path: str, job: Callable[[LocalKeyAdmin], Awaitable[int]]) -> int:
    from common.logging import configure_logging
    from controller.local import LocalKeyAdmin, UnusableDatabase

    configure_logging("console", "warning")  # stdout carries only the new key
    try:
        admin = LocalKeyAdmin(path)
    except UnusableDatabase as exc:
        print(f"llm-loadtest: {exc}", file=sys.stderr)
        return 1
    async with admin:
        return await job(admin)


async def cmd_keys(args: argparse.Namespace) -> int:
    try:
        ttl = parse_expires(args.expires) if args.keys_command == "create" else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.db:
        from controller.local import DomainError

        try:
            return await _on_db(args.db, lambda admin: _keys_on_db(args, admin, ttl))
        except DomainError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        async with open_client(args) as client:
            if args.keys_command == "create":
                created = await client.create_key(args.name, _ROLE_ENUM[args.role], ttl)
                _announce(_key_from_proto(created.key), created.secret)
            elif args.keys_command == "list":
                _print_keys([_key_from_proto(k) for k in await client.list_keys(args.all)], args.json)
            else:
                revoked = await client.revoke_key(args.key_id)
                print(f"revoked key {revoked.id} ({revoked.name})", file=sys.stderr)
    except grpc.aio.AioRpcError as exc:
        print(render.rpc_error_text(exc), file=sys.stderr)
        return 1
    return 0


async def _keys_on_db(args: argparse.Namespace, admin: LocalKeyAdmin, ttl: float | None) -> int:
    def row(r: KeyRecord) -> KeyRow:
        return KeyRow(r.key_id, r.name, r.role, r.created_at, r.expires_at, r.revoked_at)

    if args.keys_command == "create":
        record, token = await admin.create_key(args.name, args.role, ttl)
        _announce(row(record), token)
    elif args.keys_command == "list":
        _print_keys([row(r) for r in await admin.list_keys(args.all)], args.json)
    else:
        record = await admin.revoke_key(args.key_id)
        print(f"revoked key {record.key_id} ({record.name})", file=sys.stderr)
    return 0


def _announce(key: KeyRow, token: str) -> None:
    expires = f", expires {_iso(key.expires_ns)}" if key.expires_ns else ""
    print(f"created {key.role} key {key.key_id} ({key.name}){expires}", file=sys.stderr)
    print(token, flush=True)
    print("store it now: the key is not shown again", file=sys.stderr)


async def cmd_audit(args: argparse.Namespace) -> int:
    limit = max(1, min(args.limit, 1000))
    if args.db:

        async def job(admin: LocalKeyAdmin) -> int:
            rows, _token = await admin.list_audit_events(limit, "", args.key_id, args.run_id)
            _print_audit(
                [
                    AuditRow(
                        r.time_ns, r.key_id, r.method, r.run_id, r.outcome, r.request_id, r.peer, r.detail, r.count
                    )
                    for r in rows
                ],
                args.json,
            )
            return 0

        return await _on_db(args.db, job)
    try:
        async with open_client(args) as client:
            response = await client.list_audit_events(limit, "", args.key_id, args.run_id)
    except grpc.aio.AioRpcError as exc:
        print(render.rpc_error_text(exc), file=sys.stderr)
        return 1
    _print_audit(
        [
            AuditRow(
                _ts_ns(e, "time") or 0,
                e.key_id,
                e.method,
                e.run_id,
                e.outcome,
                e.request_id,
                e.peer,
                e.detail,
                e.count or 1,
            )
            for e in response.events
        ],
        args.json,
    )
    return 0
