"""TLS for the controller's gRPC port, and for the agents and clients that dial it.

The controller serves TLS with `--tls-cert`/`--tls-key`; with `--tls-client-ca` it requires
every client (agents, CLI) to present a certificate signed by that CA (mutual TLS). Agents
and the CLI use `--tls` (system roots), `--tls-ca` (a private CA), `--tls-client-cert` and
`--tls-client-key` (their own certificate for mTLS), and `--tls-server-name` when the
address dialled differs from the name in the controller's certificate.

Client flags are named apart from the controller's so that the environment variable of
each flag (see client/envconfig.py) never means two different files.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.grpc_options import CLIENT_OPTIONS


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class ServerTls:
    """The controller's certificate and key (PEM files), and optionally a client CA."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(_read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """How an agent or the CLI verifies the controller and (for mTLS) proves who it is."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate") if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        extra: list[tuple[str, Any]] = []
        if self.server_name:
            extra.append(("grpc.ssl_target_name_override", self.server_name))
        return [*CLIENT_OPTIONS, *extra]


def open_channel(address: str, tls: ClientTls | None = None) -> grpc.aio.Channel:
    """An aio channel to the controller: TLS when `tls` is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    return grpc.aio.secure_channel(address, tls.credentials(), options=tls.options())


def add_client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tls`, `--tls-ca`, `--tls-client-cert`, `--tls-client-key`, `--tls-server-name`."""
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CA roots unless --tls-ca)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate that signed the controller's (implies --tls)")
    parser.add_argument("--tls-client-cert", metavar="PEM", help="our certificate, for controllers that require mTLS")
    parser.add_argument("--tls-client-key", metavar="PEM", help="private key of --tls-client-cert")
    parser.add_argument("--tls-server-name", metavar="NAME", help="expected name in the controller's certificate")


def client_tls_from_args(args: argparse.Namespace) -> ClientTls | None:
    """The ClientTls the flags ask for, or None for plaintext. Raises ValueError."""
    wanted = any(
        getattr(args, name, None) for name in ("tls", "tls_ca", "tls_client_cert", "tls_client_key", "tls_server_name")
    )
    if not wanted:
        return None
    return ClientTls(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name)
