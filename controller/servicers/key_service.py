"""KeyService (admin only, see controller/auth.py): API keys and the audit log."""

from __future__ import annotations

import grpc

from common.durations import seconds_if_set
from common.proto.loadtest.v1 import key_service_pb2, key_service_pb2_grpc
from controller.domain.access.audit import AuditLog
from controller.domain.access.keys import KeyStore, Role
from controller.domain.results.message import timestamp
from controller.servicers.errors import unary_errors
from controller.store.security import AuditRecord, KeyRecord

_ROLE_TO_PROTO = {
    Role.ADMIN: key_service_pb2.KEY_ROLE_ADMIN,
    Role.AGENT: key_service_pb2.KEY_ROLE_AGENT,
    Role.READER: key_service_pb2.KEY_ROLE_READER,
}
_PROTO_TO_ROLE = {v: k.value for k, v in _ROLE_TO_PROTO.items()}


def key_message(record: KeyRecord) -> key_service_pb2.ApiKey:
    return key_service_pb2.ApiKey(
        id=record.key_id,
        name=record.name,
        role=_ROLE_TO_PROTO.get(Role(record.role), key_service_pb2.KEY_ROLE_UNSPECIFIED),
        create_time=timestamp(record.created_at),
        expire_time=timestamp(record.expires_at),
        revoke_time=timestamp(record.revoked_at),
    )


def audit_message(record: AuditRecord) -> key_service_pb2.AuditEvent:
    return key_service_pb2.AuditEvent(
        time=timestamp(record.time_ns),
        key_id=record.key_id,
        method=record.method,
        run_id=record.run_id,
        outcome=record.outcome,
        request_id=record.request_id,
        peer=record.peer,
        detail=record.detail,
        count=record.count,
    )


class KeyServiceServicer(key_service_pb2_grpc.KeyServiceServicer):
    def __init__(self, keys: KeyStore, audit: AuditLog) -> None:
        self._keys = keys
        self._audit = audit

    @unary_errors
    async def CreateKey(
        self, request: key_service_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.CreateKeyResponse:
        ttl = seconds_if_set(request, "ttl")
        record, token = await self._keys.create(request.name, _PROTO_TO_ROLE.get(request.role, ""), ttl)
        return key_service_pb2.CreateKeyResponse(key=key_message(record), secret=token)

    @unary_errors
    async def ListKeys(
        self, request: key_service_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.ListKeysResponse:
        records = await self._keys.list(request.include_revoked)
        return key_service_pb2.ListKeysResponse(keys=[key_message(r) for r in records])

    @unary_errors
    async def RevokeKey(
        self, request: key_service_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.RevokeKeyResponse:
        record = await self._keys.revoke(request.key_id)
        return key_service_pb2.RevokeKeyResponse(key=key_message(record))

    @unary_errors
    async def ListAuditEvents(
        self, request: key_service_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.ListAuditEventsResponse:
        rows, token = await self._audit.list(request.page_size, request.page_token, request.key_id, request.run_id)
        return key_service_pb2.ListAuditEventsResponse(events=[audit_message(r) for r in rows], next_page_token=token)
