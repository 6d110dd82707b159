"""Where a run may send traffic: the controller's allow-list of target and scrape destinations.

Agents send load to `spec.target.base_url` and scrape `spec.server_metrics.endpoints`, so
whoever may create runs may aim the agents anywhere they can reach. `DestinationPolicy`
checks every destination of a spec at CreateRun:

* Never allowed: the controller's own listeners (its gRPC and metrics ports on its own
  addresses: loopback, the unspecified address, the listen address, and when it listens on
  every interface, the addresses its host name resolves to).
* With no `--allow-target` list (the default): everything else except link-local addresses
  (169.254.0.0/16 and fe80::/10, where cloud metadata services live), AWS's IPv6 metadata
  address fd00:ec2::254 and the metadata host names of `METADATA_NAMES`.
* With a list: a destination must match one of its entries, a CIDR (`10.0.0.0/8`,
  `2001:db8::/32`, a single address) or a host-name pattern (`*.internal`, shell-style, case
  insensitive). A name matches a pattern, or every address it resolves to lies in a listed
  CIDR.

Host names are resolved here, when that is cheap (at most `RESOLVE_TIMEOUT_S`, on a resolver
pool of its own), and each address is checked; a name the controller cannot resolve passes
the default policy (the agents, on another network, may well resolve it) and needs a pattern
under a list. Numeric forms that the resolver understands (`2852039166`, `0xa9fea9fe`) are
checked by what they resolve to. What this cannot cover: an agent resolving a name to another
address than the controller did (split DNS, DNS rebinding) — the agents' network egress
rules are the real boundary (docs/security.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import FieldViolation

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT_S = 1.0
_RESOLVER_THREADS = 2
_MAX_HOST_CHARS = 100  # of a host name repeated in an error message

FORBIDDEN_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),  # IPv4 link-local: 169.254.169.254 metadata services
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS's IPv6 instance metadata address
)
# Names of metadata services that the agents may resolve even when the controller cannot.
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
    }
)
_LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_UNSPECIFIED: frozenset[IPAddress] = frozenset({ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")})


def parse_allow_entry(text: str) -> IPNetwork | str:
    """An `--allow-target` entry: a CIDR or address, else a host-name pattern (ValueError if neither)."""
    entry = text.strip()
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        pass
    if not entry or any(c.isspace() or c in "/:@[]" for c in entry):
        raise ValueError(f"--allow-target {text!r}: expected a CIDR (10.0.0.0/8) or a host pattern (*.internal)")
    return entry.lower().rstrip(".")


def listen_host(listen: str) -> str:
    """The host part of a HOST:PORT listen address, without IPv6 brackets."""
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return host.strip("[]")


def is_loopback_listen(listen: str) -> bool:
    """Whether a gRPC listen address is reachable from this machine only (a Unix socket, or a
    host that is or resolves only to loopback addresses)."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen_host(listen)
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {_normalize(ipaddress.ip_address(info[4][0])) for info in infos}
    return bool(addresses) and all(a.is_loopback for a in addresses)


def _normalize(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses (::ffff:169.254.169.254) are the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class DestinationPolicy:
    """The destinations runs may send traffic to; owned by one controller."""

    def __init__(self, allow: Sequence[str] = (), resolve_timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
        entries = [parse_allow_entry(a) for a in allow]
        self._networks = [e for e in entries if not isinstance(e, str)]
        self._patterns = [e for e in entries if isinstance(e, str)]
        self.explicit = bool(entries)
        self._timeout_s = resolve_timeout_s
        self._own_ports: set[int] = set()
        self._own_addresses: set[IPAddress] = set(_UNSPECIFIED)
        # Its own threads: a resolver that hangs must not hold the loop's default executor.
        self._resolver = concurrent.futures.ThreadPoolExecutor(_RESOLVER_THREADS, thread_name_prefix="resolver")

    async def add_listener(self, listen: str, port: int) -> None:
        """Record one of the controller's own listeners (HOST:PORT as given, the bound port)."""
        self._own_ports.add(port)
        host = listen_host(listen)
        try:
            address = _normalize(ipaddress.ip_address(host)) if host else None
        except ValueError:
            self._own_addresses.update(await self._resolve(host))
            return
        if address is None or address in _UNSPECIFIED:
            # Every interface: the host's own names stand for its addresses.
            for name in {socket.gethostname(), socket.getfqdn()}:
                self._own_addresses.update(await self._resolve(name))
        else:
            self._own_addresses.add(address)

    async def violations(self, spec: run_pb2.RunSpec) -> list[FieldViolation]:
        """A violation for each destination of a (validated) spec this controller refuses."""
        urls = [("spec.target.base_url", spec.target.base_url)]
        urls += [(f"spec.server_metrics.endpoints[{i}]", url) for i, url in enumerate(spec.server_metrics.endpoints)]
        problems = await asyncio.gather(*(self.problem(url) for _, url in urls))
        return [FieldViolation(path, p) for (path, _), p in zip(urls, problems, strict=True) if p]

    async def problem(self, url: str) -> str | None:
        """Why traffic to `url` is refused, or None."""
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = {_normalize(ipaddress.ip_address(host))}
            literal = True
        except ValueError:
            addresses = await self._resolve(host)
            literal = False
        shown = host[:_MAX_HOST_CHARS]
        for address in sorted(addresses, key=str):
            if port in self._own_ports and (address in self._own_addresses or _in(address, _LOOPBACK)):
                return f"{shown}:{port} is this controller's own listener: agents never send traffic to it"
        if not self.explicit:
            if not literal and host.lower() in METADATA_NAMES:
                return f"{shown} is a cloud metadata service: refused (docs/security.md, --allow-target)"
            for address in sorted(addresses, key=str):
                if _in(address, FORBIDDEN_NETWORKS):
                    via = "" if literal else f" (what {shown} resolves to)"
                    return (
                        f"{address}{via} is a link-local or metadata address: refused unless the controller's "
                        "--allow-target list covers it"
                    )
            return None
        if not literal and any(fnmatch.fnmatchcase(host.lower(), p) for p in self._patterns):
            return None
        if addresses and all(_in(a, self._networks) for a in addresses):
            return None
        unresolved = "" if addresses or literal else " (and the controller cannot resolve it)"
        return f"{shown} is not on this controller's --allow-target list{unresolved}"

    async def _resolve(self, host: str) -> set[IPAddress]:
        """The addresses `host` resolves to here (empty when it does not resolve in time)."""
        if not host:
            return set()
        loop = asyncio.get_running_loop()
        lookup = loop.run_in_executor(self._resolver, _getaddrinfo, host)
        try:
            return await asyncio.wait_for(lookup, self._timeout_s)
        except (TimeoutError, OSError, UnicodeError, ValueError):
            return set()

    def close(self) -> None:
        """Release the resolver threads (a lookup still running is abandoned)."""
        self._resolver.shutdown(wait=False, cancel_futures=True)


def _getaddrinfo(host: str) -> set[IPAddress]:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return {_normalize(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos}


def _in(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in networks)
