"""Scraping the model server's own Prometheus metrics during an assignment.

Two parts:

* `parse_exposition(text)`: a small, strict parser of the Prometheus text exposition format
  (and the OpenMetrics text most servers also accept) that keeps what the controller stores:
  gauges and counters. A counter family `x` yields its `x` / `x_total` samples, histograms and
  summaries their `_sum` and `_count` samples (monotonic counts); buckets, quantiles and
  the `_created` time stamps of counters and histograms are dropped; an untyped sample
  counts as a counter when its name ends in `_total`, else as a gauge. A line that is not
  valid exposition text raises `ExpositionError` with its line number, so a broken page is
  reported rather than half read.
* `ServerMetricsScraper`: scrapes each endpoint of the assignment's `ServerMetricsSpec` every
  `scrape_interval` over aiohttp and hands each result (values, or an error) to `emit` as a
  `ServerScrape`; the assignment puts them into its sample batches, so they are acked and
  replayed like the request samples. `start()` returns once the first scrape of every endpoint
  is done, so the stage's counter baseline is read before the first request is sent; `stop()`
  takes one last scrape after the load has ended, which closes the stage's counter window.

A scrape failure (connection refused, timeout, HTTP error, malformed page) is a value, not an
exception: it becomes a `ServerScrape` with `error` set, and the load is never affected.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import structlog

from agent.wire_errors import printable, transport_error
from common.durations import seconds
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from common.spec_defaults import DEFAULT_SCRAPE_INTERVAL_S, MIN_SCRAPE_INTERVAL_S

log = structlog.get_logger(__name__)

GAUGE = run_pb2.SERVER_METRIC_KIND_GAUGE
COUNTER = run_pb2.SERVER_METRIC_KIND_COUNTER

MIN_TIMEOUT_S = 2.0
# A page larger than this is not a model server's metrics page; refusing it bounds memory.
MAX_PAGE_BYTES = 8 * 1024 * 1024
# Values kept per scrape (after filtering): unfiltered servers can export thousands of series.
MAX_VALUES_PER_SCRAPE = 2000
MAX_ERROR_CHARS = 300

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{.*\}})?\s+(\S+)(?:\s+(\S+))?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped", "unknown", "gaugehistogram", "info", "stateset"}


class ExpositionError(ValueError):
    """The page is not valid Prometheus exposition text."""

    def __init__(self, line_no: int, message: str) -> None:
        super().__init__(f"malformed exposition text, line {line_no}: {message}")
        self.line_no = line_no


@dataclass(frozen=True)
class MetricSample:
    """One gauge or counter value of a page."""

    name: str
    labels: str  # `a="x",b="y"`, sorted by name, values escaped as on the wire
    kind: int  # GAUGE or COUNTER
    value: float


def _parse_value(text: str, line_no: int) -> float:
    lowered = text.lower()
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    if lowered == "nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ExpositionError(line_no, f"bad value {text[:40]!r}") from None


def _parse_labels(body: str, line_no: int) -> str:
    """`{a="x",b="y"}` to the canonical `a="x",b="y"` (sorted, escapes kept)."""
    inner = body[1:-1]
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(inner) and inner[pos:].strip():
        m = _LABEL.match(inner, pos)
        if m is None:
            raise ExpositionError(line_no, f"bad labels {body[:60]!r}")
        pairs.append((m.group(1), m.group(2)))
        pos = m.end()
        if m.group(3) == "":
            break
    if inner[pos:].strip():
        raise ExpositionError(line_no, f"bad labels {body[:60]!r}")
    return ",".join(f'{k}="{v}"' for k, v in sorted(pairs))


def _kind_of(sample_name: str, families: dict[str, str]) -> int | None:
    """GAUGE, COUNTER, or None for samples that are not kept."""
    if sample_name.endswith("_created"):
        # The creation time of a counter or histogram, whether declared on its own (as
        # prometheus_client does, as a gauge) or as part of its family.
        base = sample_name.removesuffix("_created")
        if families.get(base) in ("counter", "histogram", "summary") or families.get(base + "_total") == "counter":
            return None
    declared = families.get(sample_name)
    if declared == "gauge":
        return GAUGE
    if declared == "counter":
        return COUNTER
    for suffix in ("_total", "_sum", "_count", "_created", "_bucket"):
        if not sample_name.endswith(suffix):
            continue
        family = families.get(sample_name[: -len(suffix)])
        if family is None:
            continue
        if suffix == "_total" and family == "counter":
            return COUNTER
        if suffix in ("_sum", "_count") and family in ("histogram", "summary"):
            return COUNTER
        return None  # _created, _bucket, or a suffix that does not fit the family
    if declared in (None, "untyped", "unknown"):
        return COUNTER if sample_name.endswith("_total") else GAUGE
    return None  # histogram/summary quantiles, info, stateset


def parse_exposition(text: str) -> list[MetricSample]:
    """Every gauge and counter sample of a page, in page order; raises ExpositionError."""
    families: dict[str, str] = {}
    out: list[MetricSample] = []
    for line_no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 2 and parts[1] == "TYPE":
                if len(parts) < 4 or not re.fullmatch(_NAME, parts[2]) or parts[3].strip() not in _TYPES:
                    raise ExpositionError(line_no, f"bad TYPE line {line[:80]!r}")
                families[parts[2]] = parts[3].strip()
            elif line == "# EOF":
                break
            continue  # HELP, UNIT and comments
        m = _SAMPLE.match(line)
        if m is None:
            raise ExpositionError(line_no, f"not a sample {line[:80]!r}")
        name, label_text, value_text, stamp = m.groups()
        labels = _parse_labels(label_text, line_no) if label_text else ""
        value = _parse_value(value_text, line_no)
        if stamp is not None:
            _parse_value(stamp, line_no)  # validated, not used: we stamp the scrape ourselves
        kind = _kind_of(name, families)
        if kind is not None:
            out.append(MetricSample(name, labels, kind, value))
    return out


def name_filter(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate on metric names: any of the shell-style patterns matches (none: all)."""
    if not patterns:
        return lambda _name: True
    compiled = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda name: compiled.match(name) is not None


class ScrapeHTTPError(Exception):
    """The endpoint answered with a status other than 200."""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientError):
        return transport_error(exc, MAX_ERROR_CHARS)
    return printable(str(exc) or type(exc).__name__, MAX_ERROR_CHARS)


class ServerMetricsScraper:
    """Scrapes the endpoints of one `ServerMetricsSpec` until stopped."""

    def __init__(
        self,
        spec: run_pb2.ServerMetricsSpec,
        emit: Callable[[agent_service_pb2.ServerScrape], None],
        *,
        insecure_skip_verify: bool = False,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._endpoints = list(dict.fromkeys(spec.endpoints))
        self._interval_s = max(seconds(spec.scrape_interval) or DEFAULT_SCRAPE_INTERVAL_S, MIN_SCRAPE_INTERVAL_S)
        self._keep = name_filter(list(spec.metric_filters))
        self._emit = emit
        self._insecure = insecure_skip_verify
        self._session: aiohttp.ClientSession | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._truncation_logged = False
        self._closed = False
        self._clock = clock

    @property
    def interval_s(self) -> float:
        """Time between scrapes of one endpoint."""
        return self._interval_s

    async def start(self) -> None:
        """Scrape every endpoint once (the stage's baseline), then keep scraping in the background."""
        timeout = aiohttp.ClientTimeout(total=max(self._interval_s, MIN_TIMEOUT_S))
        connector = aiohttp.TCPConnector(ssl=False) if self._insecure else aiohttp.TCPConnector()
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        await asyncio.gather(*(self.scrape_once(e) for e in self._endpoints))
        loop = asyncio.get_running_loop()
        first_due = loop.time() + self._interval_s
        self._loops = [
            asyncio.create_task(self._loop(e, first_due), name=f"scrape-{i}") for i, e in enumerate(self._endpoints)
        ]

    async def stop(self) -> None:
        """Stop the background scrapes, then scrape every endpoint once more (the stage's end)."""
        for task in self._loops:
            task.cancel()
        if self._loops:
            await asyncio.wait(self._loops)
        self._loops = []
        if self._session is not None and not self._closed:
            await asyncio.gather(*(self.scrape_once(e) for e in self._endpoints))

    def cancel(self) -> None:
        """Stop at once (synchronous): nothing is emitted after this call."""
        self._closed = True
        for task in self._loops:
            task.cancel()

    async def close(self) -> None:
        """Release the HTTP session (after `stop()` or `cancel()`)."""
        self.cancel()
        if self._loops:
            await asyncio.wait(self._loops)
        self._loops = []
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _loop(self, endpoint: str, due: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(due - loop.time(), 0.0))
            await self.scrape_once(endpoint)
            # Fixed cadence; a scrape slower than the interval skips the ticks it overran.
            due += self._interval_s * max(1, math.ceil((loop.time() - due) / self._interval_s))

    async def scrape_once(self, endpoint: str) -> agent_service_pb2.ServerScrape:
        """Scrape one endpoint now and emit the result (values or an error)."""
        scrape = agent_service_pb2.ServerScrape(endpoint=endpoint)
        try:
            if self._session is None:
                raise RuntimeError("scraper is not started")
            text = await self._fetch(self._session, endpoint)
            scrape.time_unix_ns = self._clock()
            samples = [s for s in parse_exposition(text) if self._keep(s.name)]
            if len(samples) > MAX_VALUES_PER_SCRAPE:
                if not self._truncation_logged:
                    log.warning(
                        "server_metrics_truncated",
                        endpoint=endpoint,
                        values=len(samples),
                        kept=MAX_VALUES_PER_SCRAPE,
                        hint="set metric filters",
                    )
                    self._truncation_logged = True
                samples = samples[:MAX_VALUES_PER_SCRAPE]
            scrape.values.extend(
                agent_service_pb2.ServerMetricValue(name=s.name, labels=s.labels, kind=s.kind, value=s.value)  # type: ignore[arg-type]
                for s in samples
            )
        except asyncio.CancelledError:
            raise
        except (
            aiohttp.ClientError,
            TimeoutError,
            OSError,
            ExpositionError,
            ScrapeHTTPError,
            RuntimeError,
            UnicodeDecodeError,
        ) as exc:
            scrape.time_unix_ns = self._clock()
            del scrape.values[:]
            if isinstance(exc, TimeoutError):
                scrape.error = "timed out"
            elif isinstance(exc, aiohttp.ClientConnectorError):
                scrape.error = f"cannot connect: {_error_text(exc.os_error)}"
            else:
                scrape.error = _error_text(exc)
            log.debug("server_metrics_scrape_failed", endpoint=endpoint, error=scrape.error)
        if not self._closed:
            self._emit(scrape)
        return scrape

    @staticmethod
    async def _fetch(session: aiohttp.ClientSession, endpoint: str) -> str:
        headers = {"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1"}
        # Redirects are not followed: an allowed endpoint must not lead the agent elsewhere.
        async with session.get(endpoint, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise ScrapeHTTPError(f"HTTP {response.status} {response.reason or ''}".strip())
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_PAGE_BYTES:
                    raise ExpositionError(0, f"page larger than {MAX_PAGE_BYTES} bytes")
            return body.decode("utf-8")
