"""The load clients the agent benchmarks compare, each run as its own pinned process.

    python bench/_clients.py KIND --url URL --streams N --duration S --out FILE.npz

KIND is one of:

* `floor`: raw sockets on uvloop protocols, no HTTP or SSE parsing at all: a pre-encoded
  request is written, and each read is only scanned for the first token (`"content":"` not
  followed by `"`) and for the end of the chunked body; the next request goes out on the
  same connection. The cheapest a streaming client can be in Python: the floor.
* `aiohttp`: a minimal aiohttp + uvloop client: one session, `iter_any()` over the body,
  the same byte scans as `floor`, no JSON decoding.
* `agent`: llm-loadtest's own load path (`AssignmentRunner`: scheduler, `TargetClient`,
  `StreamParser`, `SampleBatcher`), with every sealed batch serialized as it would be for
  the gRPC stream and acked at once. Its Assign asks for 128-token prompts and `max_tokens`.

All three run a closed loop of N streams until `--duration` has passed, and write for every
completed request its wall-clock send time, TTFT and (floor/aiohttp: per read carrying
tokens; agent: per text event) inter-token gaps, in ns, to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import uvloop

PROMPT_WORDS = 128
MAX_TOKENS = 128
_TOKEN = b'"content":"'
_END = b"\r\n0\r\n\r\n"


def request_body(model: str = "mock") -> bytes:
    """The chat request the floor and aiohttp clients send (the agent builds its own)."""
    prompt = " ".join(["word"] * PROMPT_WORDS)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


def _has_token(data: bytes) -> bool:
    i = data.find(_TOKEN)
    while i >= 0:
        j = i + len(_TOKEN)
        if j < len(data) and data[j] != 0x22:  # a non-empty content string
            return True
        i = data.find(_TOKEN, j)
    return False


class Results:
    """What every client records: per request its send time and TTFT, and all gaps."""

    def __init__(self) -> None:
        self.sent_unix_ns: list[int] = []
        self.ttft_ns: list[int] = []
        self.itl_ns: list[int] = []
        self.itl_sent_unix_ns: list[int] = []

    def add(self, sent_unix_ns: int, ttft_ns: int, gaps: list[int]) -> None:
        self.sent_unix_ns.append(sent_unix_ns)
        self.ttft_ns.append(ttft_ns)
        self.itl_ns.extend(gaps)
        self.itl_sent_unix_ns.extend([sent_unix_ns] * len(gaps))

    def save(self, path: str) -> None:
        np.savez(
            path,
            sent_unix_ns=np.asarray(self.sent_unix_ns, dtype=np.int64),
            ttft_ns=np.asarray(self.ttft_ns, dtype=np.int64),
            itl_ns=np.asarray(self.itl_ns, dtype=np.int64),
            itl_sent_unix_ns=np.asarray(self.itl_sent_unix_ns, dtype=np.int64),
        )


# --- floor: raw sockets ---------------------------------------------------------------------


class _RawStream(asyncio.Protocol):
    def __init__(self, request: bytes, results: Results, stop_at: float) -> None:
        self._request = request
        self._results = results
        self._stop_at = stop_at
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sent = 0
        self._sent_unix = 0
        self._first = 0
        self._last = 0
        self._gaps: list[int] = []
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        self._first = self._last = 0
        self._gaps = []
        self._sent_unix = time.time_ns()
        self._sent = time.perf_counter_ns()
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        if _has_token(data):
            if self._first:
                self._gaps.append(now - self._last)
            else:
                self._first = now
            self._last = now
        if (self._tail + data[-8:]).endswith(_END):
            self._results.add(self._sent_unix, self._first - self._sent, self._gaps)
            self._tail = b""
            if time.monotonic() < self._stop_at:
                self._send()
            else:
                assert self._transport is not None
                self._transport.close()
        else:
            self._tail = data[-8:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def run_floor(url: str, streams: int, duration: float, results: Results) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = request_body()
    request = (
        f"POST {parts.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    stop_at = time.monotonic() + duration
    protocols = []
    for i in range(streams):
        await asyncio.sleep(_spread(i, streams))
        _, protocol = await loop.create_connection(lambda: _RawStream(request, results, stop_at), host, port)
        protocols.append(protocol)
    await asyncio.gather(*(p.closed for p in protocols))


def _spread(i: int, streams: int) -> float:
    # Starts spread over a short window (2 ms per stream, at most 1 s), as the agent does.
    return min(1.0, 0.002 * streams) / streams if i else 0.0


# --- minimal aiohttp ------------------------------------------------------------------------


async def run_aiohttp(url: str, streams: int, duration: float, results: Results) -> None:
    import aiohttp

    body = request_body()
    target = url.rstrip("/") + "/chat/completions"
    stop_at = time.monotonic() + duration
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(i: int) -> None:
            await asyncio.sleep(i * _spread(1, streams))
            clock = time.perf_counter_ns
            while time.monotonic() < stop_at:
                first = last = 0
                gaps: list[int] = []
                sent_unix = time.time_ns()
                sent = clock()
                async with session.post(target, data=body, headers=headers) as resp:
                    async for chunk in resp.content.iter_any():
                        now = clock()
                        if _has_token(chunk):
                            if first:
                                gaps.append(now - last)
                            else:
                                first = now
                            last = now
                results.add(sent_unix, first - sent, gaps)

        await asyncio.gather(*(worker(i) for i in range(streams)))


# --- llm-loadtest's agent ------------------------------------------------------------------


async def run_agent(url: str, streams: int, duration: float, results: Results) -> None:
    from agent.assignment import AssignmentRunner
    from agent.gcload import freeze_startup
    from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

    stage = run_pb2.Stage(concurrency=streams)
    stage.duration.FromNanoseconds(int(duration * 1e9))
    assign = agent_service_pb2.Assign(
        assignment_id="bench",
        run_id="bench",
        target=run_pb2.Target(base_url=url, model="mock"),
        workload=run_pb2.Workload(
            seed=1,
            synthetic=run_pb2.SyntheticWorkload(
                input_tokens=run_pb2.LengthDistribution(fixed=PROMPT_WORDS),
                output_tokens=run_pb2.LengthDistribution(fixed=MAX_TOKENS),
            ),
        ),
        stage=stage,
    )
    batches: list[Any] = []
    runner: AssignmentRunner

    def emit(message: Any) -> None:
        if message.HasField("sample_batch"):
            batch = message.sample_batch
            message.SerializeToString()  # what the session's gRPC stream would do
            batches.append(batch)
            runner.ack(batch.batch_seq)

    runner = AssignmentRunner(assign, emit)
    freeze_startup()  # as `llm-loadtest agent` does once it is connected
    await runner.start()
    for b in batches:
        sent = np.asarray(b.sent_unix_ns, dtype=np.int64)
        ttft = np.asarray(b.first_token_ns, dtype=np.int64)
        counts = np.asarray(b.itl_count, dtype=np.int64)
        itl = np.asarray(b.itl_ns, dtype=np.int64)
        ok = np.asarray(b.status) == run_pb2.REQUEST_STATUS_OK
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(sent)):
            if ok[i]:
                results.add(int(sent[i]), int(ttft[i]), itl[starts[i] : starts[i + 1]].tolist())


RUNNERS = {"floor": run_floor, "aiohttp": run_aiohttp, "agent": run_agent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(RUNNERS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = Results()
    uvloop.run(RUNNERS[args.kind](args.url, args.streams, args.duration, results))
    results.save(args.out)


if __name__ == "__main__":
    main()
