"""gRPC channel and server options shared by controller, agents and clients.

Keepalive is set explicitly on both sides and agrees: agents ping every 20 s, the
controller permits pings every 10 s even without active calls, so idle agents never
get `too_many_pings` GOAWAYs. Message sizes are explicit: a sample batch of a few
thousand samples with their inter-token gaps stays far below 16 MiB.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]

CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

API_KEY_METADATA = "x-api-key"
REQUEST_ID_METADATA = "x-request-id"
API_KEY_ENV = "LLM_LOADTEST_API_KEY"


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying our API key, or nothing when no key is configured."""
    return ((API_KEY_METADATA, api_key),) if api_key else ()
