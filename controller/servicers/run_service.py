"""RunService: unpack the request, call the domain, pack the answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from common.proto.loadtest.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from controller.domain.baselines import Baselines
from controller.domain.errors import FieldViolation, InvalidArgument
from controller.domain.runs import Runs
from controller.servicers import convert
from controller.servicers.errors import stream_errors, unary_errors
from controller.store.repository import RunRecord

WATCH_INTERVAL_S = 1.0
WATCH_MIN_GAP_S = 0.25  # at most four updates a second, however busy the run
LIST_CONCURRENCY = 2
# ListRuns pages sent per second, in bytes, over all callers together: sending is event-loop time
# (gRPC's framing and writes), and no amount of paging may take the loop from the agents.
LIST_BYTES_PER_S = 16 * 1024 * 1024
LIST_BURST_BYTES = 4 * 1024 * 1024
# Watchers of one run share its state read and converted within this long: 200 watchers cost
# one read and one conversion per update instead of 200 (they wake together on the hub).
WATCH_SHARE_S = 0.1


def add_to_server(servicer: RunServiceServicer, server: grpc.aio.Server) -> None:
    """Register RunService; ListRuns answers with the bytes its servicer serialized on a worker
    thread (gRPC would otherwise serialize the page on the event loop)."""
    run_service_pb2_grpc.add_RunServiceServicer_to_server(servicer, _PreserializedListRuns(server))


class _PreserializedListRuns:
    """What the generated registration sees as the server: it swaps ListRuns' serializer for
    one that passes bytes through, then registers the service (generic and registered handlers
    alike) on the real server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # registered with the patched handlers in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        handlers["ListRuns"] = handlers["ListRuns"]._replace(response_serializer=_bytes_or_message)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)


class _BytePacer:
    """Spaces pages out so that they average at most `rate` bytes a second (a token bucket of
    `burst` bytes): each page pushes the next one's start back by its size over the rate, so
    paging at a modest pace never waits."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._credit_s = burst / rate
        self._next = 0.0

    async def turn(self) -> None:
        wait = self._next - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def spent(self, size: int) -> None:
        self._next = max(self._next, time.monotonic() - self._credit_s) + size / self._rate


def _bytes_or_message(response: bytes | Message) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _serialized_page(records: list[RunRecord], token: str) -> bytes:
    return convert.list_response(records, token).SerializeToString()


class _SharedRunReads:
    """A run's record and its converted message, read once for every watcher that asks within
    WATCH_SHARE_S (concurrent askers await the same read)."""

    def __init__(self, runs: Runs) -> None:
        self._runs = runs
        self._reads: dict[str, tuple[float, asyncio.Future[tuple[RunRecord, run_pb2.Run]]]] = {}

    async def get(self, run_id: str) -> tuple[RunRecord, run_pb2.Run]:
        now = time.monotonic()
        shared = self._reads.get(run_id)
        if shared is None or now - shared[0] > WATCH_SHARE_S or (shared[1].done() and shared[1].exception()):
            for stale in [r for r, (t, _) in self._reads.items() if now - t > WATCH_SHARE_S]:
                del self._reads[stale]
            shared = (now, asyncio.ensure_future(self._read(run_id)))
            self._reads[run_id] = shared
        # Shielded: one watcher going away must not cancel the read the others wait for.
        return await asyncio.shield(shared[1])

    async def _read(self, run_id: str) -> tuple[RunRecord, run_pb2.Run]:
        record = await self._runs.get(run_id)
        return record, convert.run_message(record)


class RunServiceServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, runs: Runs, baselines: Baselines) -> None:
        self._runs = runs
        self._baselines = baselines
        self._watched = _SharedRunReads(runs)
        # However many callers page at once, at most this many pages are built and sent at a
        # time: each is a slice of the event loop (serializing it), and the loop also reads
        # the agents' heartbeats. The others wait their turn, off the loop.
        self._list_gate = asyncio.Semaphore(LIST_CONCURRENCY)
        self._list_pacer = _BytePacer(LIST_BYTES_PER_S, LIST_BURST_BYTES)

    @unary_errors
    async def CreateRun(
        self, request: run_service_pb2.CreateRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.CreateRunResponse:
        records = await self._runs.create(request.spec, request.request_id, request.repeat)
        response = run_service_pb2.CreateRunResponse(run=convert.run_message(records[0]))
        if records[0].group_id:
            response.group.CopyFrom(convert.group_message(records))
        return response

    @unary_errors
    async def GetRun(
        self, request: run_service_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.GetRunResponse:
        record = await self._runs.get(request.run_id)
        events = await self._runs.events(record, 0)
        return run_service_pb2.GetRunResponse(
            run=convert.run_message(record), events=[convert.event_message(e) for e in events]
        )

    @unary_errors
    async def ListRuns(  # type: ignore[override]  # the page goes out serialized (add_to_server)
        self, request: run_service_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        async with self._list_gate:
            await self._list_pacer.turn()
            # Parsing a page of specs and serializing it is done off the event loop the agent
            # streams' heartbeats share: on the loop it delayed them (BENCHMARKS.md, section 8).
            page = await self._runs.list_runs(
                request.page_size,
                request.page_token,
                request.state,
                request.model,
                _serialized_page,
                request.series,
                request.group_id,
            )
            self._list_pacer.spent(len(page))
            return page

    @unary_errors
    async def CancelRun(
        self, request: run_service_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.CancelRunResponse:
        record = await self._runs.cancel(request.run_id, request.reason)
        return run_service_pb2.CancelRunResponse(run=convert.run_message(record))

    @unary_errors
    async def DeleteRun(
        self, request: run_service_pb2.DeleteRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.DeleteRunResponse:
        await self._runs.delete(request.run_id)
        return run_service_pb2.DeleteRunResponse()

    @unary_errors
    async def GetRunResult(
        self, request: run_service_pb2.GetRunResultRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.GetRunResultResponse:
        _, result = await self._runs.result(request.run_id)
        return run_service_pb2.GetRunResultResponse(result=result)

    @stream_errors
    async def WatchRun(
        self, request: run_service_pb2.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_service_pb2.WatchRunResponse]:
        record, run = await self._watched.get(request.run_id)
        last_event = 0
        while True:
            events = await self._runs.events(record, last_event)
            if events:
                last_event = events[-1].pk
            message = run_service_pb2.WatchRunResponse(run=run, events=[convert.event_message(e) for e in events])
            if record.is_final:
                record, result = await self._runs.result(request.run_id)
                message.run.CopyFrom(convert.run_message(record))
                message.result.CopyFrom(result)
                yield message
                return
            live = self._runs.live(request.run_id)
            if live is not None:
                message.live.CopyFrom(convert.live_message(live))
            sent_at = time.monotonic()
            yield message
            await self._runs.hub.wait(request.run_id, WATCH_INTERVAL_S)
            gap = WATCH_MIN_GAP_S - (time.monotonic() - sent_at)
            if gap > 0:
                await asyncio.sleep(gap)
            record, run = await self._watched.get(request.run_id)

    @stream_errors
    async def ExportRunSamples(
        self, request: run_service_pb2.ExportRunSamplesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_service_pb2.ExportRunSamplesResponse]:
        async for rows in self._runs.export(request.run_id, request.page_size, request.include_warmup):
            yield run_service_pb2.ExportRunSamplesResponse(
                samples=[convert.exported_sample(row) for row in rows], schema_version=convert.EXPORT_SCHEMA_VERSION
            )

    @unary_errors
    async def CompareRuns(
        self, request: run_service_pb2.CompareRunsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.CompareRunsResponse:
        baseline_run_id = request.baseline_run_id
        if request.baseline_name:
            if baseline_run_id:
                raise InvalidArgument([FieldViolation("baseline_name", "give baseline_run_id or baseline_name")])
            baseline_run_id = await self._baselines.resolve(request.baseline_name)
        comparison = await self._runs.compare(
            baseline_run_id,
            list(request.run_ids),
            request.tolerance_percent,
            request.confidence_percent,
            list(request.metrics),
        )
        response = convert.compare_message(comparison)
        response.baseline_name = request.baseline_name
        return response

    @unary_errors
    async def GetGroupResult(
        self, request: run_service_pb2.GetGroupResultRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.GetGroupResultResponse:
        records, result = await self._runs.group(request.group_id)
        return run_service_pb2.GetGroupResultResponse(result=result, runs=[convert.run_message(r) for r in records])

    @unary_errors
    async def SetBaseline(
        self, request: run_service_pb2.SetBaselineRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.SetBaselineResponse:
        # The caller's key id, as the auth interceptor bound it for this call (controller/auth.py).
        key_id = str(structlog.contextvars.get_contextvars().get("key_id", ""))
        record = await self._baselines.set_baseline(request.name, request.run_id, key_id)
        return run_service_pb2.SetBaselineResponse(baseline=convert.baseline_message(record))

    @unary_errors
    async def GetBaseline(
        self, request: run_service_pb2.GetBaselineRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.GetBaselineResponse:
        record = await self._baselines.get_baseline(request.name)
        return run_service_pb2.GetBaselineResponse(baseline=convert.baseline_message(record))

    @unary_errors
    async def ListBaselines(
        self, request: run_service_pb2.ListBaselinesRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListBaselinesResponse:
        records = await self._baselines.list_baselines()
        return run_service_pb2.ListBaselinesResponse(baselines=[convert.baseline_message(r) for r in records])

    @unary_errors
    async def DeleteBaseline(
        self, request: run_service_pb2.DeleteBaselineRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.DeleteBaselineResponse:
        await self._baselines.delete_baseline(request.name)
        return run_service_pb2.DeleteBaselineResponse()

    @unary_errors
    async def GetSeriesHistory(
        self, request: run_service_pb2.GetSeriesHistoryRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.GetSeriesHistoryResponse:
        history = await self._baselines.history(
            request.name, request.metric, request.label, request.load, request.limit
        )
        return convert.history_message(history)

    @unary_errors
    async def ListAgents(
        self, request: run_service_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListAgentsResponse:
        return run_service_pb2.ListAgentsResponse(agents=[convert.agent_message(s) for s in self._runs.agents()])
