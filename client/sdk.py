"""A small Python SDK over the generated stubs: one channel, a deadline on every call,
the API key in metadata."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType

import grpc

from common.datasets import dataset_id
from common.grpc_options import auth_metadata
from common.proto.loadtest.v1 import (
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from common.tls import ClientTls, open_channel


class ControllerClient:
    """Talks to one controller's RunService."""

    def __init__(
        self, address: str, api_key: str | None = None, timeout_s: float = 30.0, tls: ClientTls | None = None
    ) -> None:
        self._channel = open_channel(address, tls)
        self._stub = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._keys = key_service_pb2_grpc.KeyServiceStub(self._channel)
        self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(self._channel)
        self._metadata = auth_metadata(api_key)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> ControllerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the channel is connected (raises TimeoutError)."""
        import asyncio

        async with asyncio.timeout(timeout_s):
            await self._channel.channel_ready()

    async def create_run(self, spec: run_pb2.RunSpec, request_id: str = "") -> run_pb2.Run:
        response: run_service_pb2.CreateRunResponse = await self._stub.CreateRun(
            run_service_pb2.CreateRunRequest(spec=spec, request_id=request_id),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response.run

    async def create_group(self, spec: run_pb2.RunSpec, repeat: int, request_id: str = "") -> run_pb2.RunGroup:
        """A group of `repeat` runs of the spec, run one after another (CreateRun's `repeat`)."""
        response: run_service_pb2.CreateRunResponse = await self._stub.CreateRun(
            run_service_pb2.CreateRunRequest(spec=spec, request_id=request_id, repeat=repeat),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response.group

    async def get_group_result(self, group_id: str) -> run_service_pb2.GetGroupResultResponse:
        """A group's result (figures over its SUCCEEDED runs) and its runs."""
        response: run_service_pb2.GetGroupResultResponse = await self._stub.GetGroupResult(
            run_service_pb2.GetGroupResultRequest(group_id=group_id), metadata=self._metadata, timeout=self.timeout_s
        )
        return response

    async def get_run(self, run_id: str) -> run_pb2.Run:
        response: run_service_pb2.GetRunResponse = await self._stub.GetRun(
            run_service_pb2.GetRunRequest(run_id=run_id), metadata=self._metadata, timeout=self.timeout_s
        )
        return response.run

    async def get_run_events(self, run_id: str) -> list[run_service_pb2.RunEvent]:
        """The run's events so far (GetRun), oldest first."""
        response: run_service_pb2.GetRunResponse = await self._stub.GetRun(
            run_service_pb2.GetRunRequest(run_id=run_id), metadata=self._metadata, timeout=self.timeout_s
        )
        return list(response.events)

    async def list_runs(
        self,
        page_size: int = 50,
        page_token: str = "",
        state: int = 0,
        model: str = "",
        series: str = "",
        group_id: str = "",
    ) -> run_service_pb2.ListRunsResponse:
        response: run_service_pb2.ListRunsResponse = await self._stub.ListRuns(
            run_service_pb2.ListRunsRequest(
                page_size=page_size,
                page_token=page_token,
                state=state,  # type: ignore[arg-type]
                model=model,
                series=series,
                group_id=group_id,
            ),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response

    async def cancel_run(self, run_id: str, reason: str = "") -> run_pb2.Run:
        response: run_service_pb2.CancelRunResponse = await self._stub.CancelRun(
            run_service_pb2.CancelRunRequest(run_id=run_id, reason=reason),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response.run

    async def delete_run(self, run_id: str) -> None:
        await self._stub.DeleteRun(
            run_service_pb2.DeleteRunRequest(run_id=run_id), metadata=self._metadata, timeout=self.timeout_s
        )

    async def get_result(self, run_id: str) -> run_pb2.RunResult:
        response: run_service_pb2.GetRunResultResponse = await self._stub.GetRunResult(
            run_service_pb2.GetRunResultRequest(run_id=run_id),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response.result

    async def list_agents(self) -> list[run_pb2.Agent]:
        response: run_service_pb2.ListAgentsResponse = await self._stub.ListAgents(
            run_service_pb2.ListAgentsRequest(), metadata=self._metadata, timeout=self.timeout_s
        )
        return list(response.agents)

    async def export_samples(
        self, run_id: str, page_size: int = 1000, include_warmup: bool = False
    ) -> AsyncIterator[run_service_pb2.ExportedSample]:
        """Every stored sample of a run (streamed in pages; no overall deadline)."""
        call = self._stub.ExportRunSamples(
            run_service_pb2.ExportRunSamplesRequest(run_id=run_id, page_size=page_size, include_warmup=include_warmup),
            metadata=self._metadata,
        )
        async for page in call:
            for sample in page.samples:
                yield sample

    async def compare_runs(
        self,
        baseline_run_id: str,
        run_ids: list[str],
        tolerance_percent: float = 0.0,
        confidence_percent: float = 0.0,
        metrics: Sequence[str] = (),
        *,
        baseline_name: str = "",
    ) -> run_service_pb2.CompareRunsResponse:
        """Compare with a baseline run (or group), or with the baseline of the series
        `baseline_name`; 0 for the tolerance or the confidence means the controller's default."""
        response: run_service_pb2.CompareRunsResponse = await self._stub.CompareRuns(
            run_service_pb2.CompareRunsRequest(
                baseline_run_id=baseline_run_id,
                run_ids=run_ids,
                tolerance_percent=tolerance_percent,
                confidence_percent=confidence_percent,
                metrics=metrics,
                baseline_name=baseline_name,
            ),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response

    async def set_baseline(self, name: str, run_id: str) -> run_service_pb2.Baseline:
        response: run_service_pb2.SetBaselineResponse = await self._stub.SetBaseline(
            run_service_pb2.SetBaselineRequest(name=name, run_id=run_id),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response.baseline

    async def get_baseline(self, name: str) -> run_service_pb2.Baseline:
        response: run_service_pb2.GetBaselineResponse = await self._stub.GetBaseline(
            run_service_pb2.GetBaselineRequest(name=name), metadata=self._metadata, timeout=self.timeout_s
        )
        return response.baseline

    async def list_baselines(self) -> list[run_service_pb2.Baseline]:
        response: run_service_pb2.ListBaselinesResponse = await self._stub.ListBaselines(
            run_service_pb2.ListBaselinesRequest(), metadata=self._metadata, timeout=self.timeout_s
        )
        return list(response.baselines)

    async def delete_baseline(self, name: str) -> None:
        await self._stub.DeleteBaseline(
            run_service_pb2.DeleteBaselineRequest(name=name), metadata=self._metadata, timeout=self.timeout_s
        )

    async def series_history(
        self, name: str, metric: str = "", label: str = "", load: str = "", limit: int = 0
    ) -> run_service_pb2.GetSeriesHistoryResponse:
        """One metric over the series' runs, oldest first (GetSeriesHistory)."""
        response: run_service_pb2.GetSeriesHistoryResponse = await self._stub.GetSeriesHistory(
            run_service_pb2.GetSeriesHistoryRequest(name=name, metric=metric, label=label, load=load, limit=limit),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response

    async def watch(self, run_id: str) -> AsyncIterator[run_service_pb2.WatchRunResponse]:
        """Live updates until the run ends (no deadline: the server sends one a second)."""
        call = self._stub.WatchRun(run_service_pb2.WatchRunRequest(run_id=run_id), metadata=self._metadata)
        async for update in call:
            yield update

    # --- KeyService (admin keys only) ---------------------------------------------------

    async def create_key(
        self, name: str, role: key_service_pb2.KeyRole.ValueType, ttl_s: float | None = None
    ) -> key_service_pb2.CreateKeyResponse:
        """A new API key; the response's `secret` is the whole key, shown only this once."""
        request = key_service_pb2.CreateKeyRequest(name=name, role=role)
        if ttl_s is not None:
            request.ttl.FromNanoseconds(int(ttl_s * 1e9))
        response: key_service_pb2.CreateKeyResponse = await self._keys.CreateKey(
            request, metadata=self._metadata, timeout=self.timeout_s
        )
        return response

    async def list_keys(self, include_revoked: bool = False) -> list[key_service_pb2.ApiKey]:
        response: key_service_pb2.ListKeysResponse = await self._keys.ListKeys(
            key_service_pb2.ListKeysRequest(include_revoked=include_revoked),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return list(response.keys)

    async def revoke_key(self, key_id: str) -> key_service_pb2.ApiKey:
        response: key_service_pb2.RevokeKeyResponse = await self._keys.RevokeKey(
            key_service_pb2.RevokeKeyRequest(key_id=key_id), metadata=self._metadata, timeout=self.timeout_s
        )
        return response.key

    async def list_audit_events(
        self, page_size: int = 100, page_token: str = "", key_id: str = "", run_id: str = ""
    ) -> key_service_pb2.ListAuditEventsResponse:
        response: key_service_pb2.ListAuditEventsResponse = await self._keys.ListAuditEvents(
            key_service_pb2.ListAuditEventsRequest(
                page_size=page_size, page_token=page_token, key_id=key_id, run_id=run_id
            ),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response

    # --- datasets ----------------------------------------------------------------------

    async def upload_dataset(
        self, source: str | Path | bytes, fmt: int, name: str = "", *, check_first: bool = True
    ) -> dataset_service_pb2.UploadDatasetResponse:
        """Upload a file (a path, read in chunks, never whole) or bytes as a dataset of format
        `fmt`. With `check_first` the content's id is computed locally first and, when the
        controller has it already, nothing is sent (`already_present`)."""
        if isinstance(source, bytes):
            size, sha = len(source), hashlib.sha256(source).hexdigest()
        else:
            size, sha = await asyncio.to_thread(_file_digest, Path(source))
        if check_first:
            try:
                known = await self.get_dataset(dataset_id(fmt, sha))
                return dataset_service_pb2.UploadDatasetResponse(dataset=known, already_present=True)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        async def requests() -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
            header = dataset_service_pb2.UploadDatasetHeader(name=name, format=fmt, size_bytes=size)  # type: ignore[arg-type]
            yield dataset_service_pb2.UploadDatasetRequest(header=header)
            if isinstance(source, bytes):
                for i in range(0, len(source), UPLOAD_CHUNK_BYTES):
                    yield dataset_service_pb2.UploadDatasetRequest(chunk=source[i : i + UPLOAD_CHUNK_BYTES])
                return
            f = await asyncio.to_thread(Path(source).open, "rb")
            try:
                while block := await asyncio.to_thread(f.read, UPLOAD_CHUNK_BYTES):
                    yield dataset_service_pb2.UploadDatasetRequest(chunk=block)
            finally:
                f.close()

        # A deadline that grows with the size (at least 2 MB/s on top of the usual one).
        timeout = self.timeout_s + size / 2e6
        response: dataset_service_pb2.UploadDatasetResponse = await self._datasets.UploadDataset(
            requests(), metadata=self._metadata, timeout=timeout
        )
        return response

    async def get_dataset(self, dataset_id_: str) -> dataset_service_pb2.DatasetInfo:
        response: dataset_service_pb2.GetDatasetResponse = await self._datasets.GetDataset(
            dataset_service_pb2.GetDatasetRequest(dataset_id=dataset_id_),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response.dataset

    async def list_datasets(
        self, page_size: int = 50, page_token: str = "", fmt: int = 0
    ) -> dataset_service_pb2.ListDatasetsResponse:
        response: dataset_service_pb2.ListDatasetsResponse = await self._datasets.ListDatasets(
            dataset_service_pb2.ListDatasetsRequest(page_size=page_size, page_token=page_token, format=fmt),  # type: ignore[arg-type]
            metadata=self._metadata,
            timeout=self.timeout_s,
        )
        return response

    async def delete_dataset(self, dataset_id_: str) -> None:
        await self._datasets.DeleteDataset(
            dataset_service_pb2.DeleteDatasetRequest(dataset_id=dataset_id_),
            metadata=self._metadata,
            timeout=self.timeout_s,
        )


UPLOAD_CHUNK_BYTES = 1 << 20


def _file_digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(UPLOAD_CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()
