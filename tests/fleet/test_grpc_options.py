"""Keepalive and message sizes agree between agents (clients) and the controller."""

from __future__ import annotations

from common.grpc_options import CLIENT_OPTIONS, MAX_MESSAGE_BYTES, SERVER_OPTIONS


def test_client_pings_no_more_often_than_the_server_permits() -> None:
    client, server = dict(CLIENT_OPTIONS), dict(SERVER_OPTIONS)
    # Idle agents ping without calls; the server must permit that, at their rate, or it
    # answers with too_many_pings GOAWAYs.
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]


def test_message_sizes_are_explicit_and_equal_both_ways() -> None:
    for options in (CLIENT_OPTIONS, SERVER_OPTIONS):
        opts = dict(options)
        assert opts["grpc.max_receive_message_length"] == opts["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
