"""RunService: unpack the request, call the domain, pack the answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from common.proto.loadtest.v1 import run_service_pb2, run_service_pb2_grpc
from controller.domain.runs import Runs
from controller.servicers import convert
from controller.servicers.errors import stream_errors, unary_errors

WATCH_INTERVAL_S = 1.0
WATCH_MIN_GAP_S = 0.25  # at most four updates a second, however busy the run
LIST_CONCURRENCY = 2


class RunServiceServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, runs: Runs) -> None:
        self._runs = runs
        # However many callers page at once, at most this many pages are built and sent at a
        # time: each is a slice of the event loop (serializing it), and the loop also reads
        # the agents' heartbeats. The others wait their turn, off the loop.
        self._list_gate = asyncio.Semaphore(LIST_CONCURRENCY)

    @unary_errors
    async def CreateRun(
        self, request: run_service_pb2.CreateRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.CreateRunResponse:
        record = await self._runs.create(request.spec, request.request_id)
        return run_service_pb2.CreateRunResponse(run=convert.run_message(record))

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
    async def ListRuns(
        self, request: run_service_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListRunsResponse:
        async with self._list_gate:
            records, token = await self._runs.list_runs(
                request.page_size, request.page_token, request.state, request.model
            )
            # Parsing a page of specs is off the event loop the agent streams' heartbeats share.
            return await asyncio.to_thread(convert.list_response, records, token)

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
        record = await self._runs.get(request.run_id)
        last_event = 0
        while True:
            events = await self._runs.events(record, last_event)
            if events:
                last_event = events[-1].pk
            message = run_service_pb2.WatchRunResponse(
                run=convert.run_message(record), events=[convert.event_message(e) for e in events]
            )
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
            record = await self._runs.get(request.run_id)

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
        baseline, comparisons = await self._runs.compare(
            request.baseline_run_id, list(request.run_ids), request.tolerance_percent
        )
        return convert.compare_message(baseline, comparisons)

    @unary_errors
    async def ListAgents(
        self, request: run_service_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListAgentsResponse:
        return run_service_pb2.ListAgentsResponse(
            agents=[convert.agent_message(s) for s in self._runs.agents()]
        )
