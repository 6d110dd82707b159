"""What the report shows of one run, gathered from the controller (or a `--db` file): the run,
its result and, unless skipped, a digest of its exported samples.

The samples are digested as they stream in (a long run has millions): only the per-request
TTFT and TPOT of each stage's OK requests are kept, TPOT as common/metrics.py defines it, and
for requests that reasoned their times to first reasoning and first answer token.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from client.formats import GROUP_ID_PREFIX, group_as_run
from client.sdk import ControllerClient
from common.metrics import per_request_tpot
from common.proto.loadtest.v1 import run_pb2, run_service_pb2


class StageLatencies:
    """Per-request latencies of one stage's OK streamed requests, in ms."""

    def __init__(self) -> None:
        self.ttft_ms: list[float] = []
        # The TPOT inputs of each request in `ttft_ms`; TPOT itself is computed when first read.
        self._last_token_ms: list[float] = []
        self._output_tokens: list[int] = []
        self._tpot_ms: list[float] | None = None
        # Reasoning models: time to first reasoning / answer token of the requests that reasoned.
        self.ttfr_ms: list[float] = []
        self.ttfo_ms: list[float] = []

    def add(self, ttft_ms: float, last_token_ms: float, output_tokens: int) -> None:
        self.ttft_ms.append(ttft_ms)
        self._last_token_ms.append(last_token_ms)
        self._output_tokens.append(output_tokens)
        self._tpot_ms = None

    @property
    def tpot_ms(self) -> list[float]:
        """TPOT of each request that has one, in the order they were added."""
        if self._tpot_ms is None:
            values, defined = per_request_tpot(self.ttft_ms, self._last_token_ms, self._output_tokens)
            self._tpot_ms = values[defined].tolist()
        return self._tpot_ms


class SampleDigest:
    """The columns of exported samples the report draws, kept per stage (the samples
    themselves are not kept: a long run has millions)."""

    def __init__(self) -> None:
        self.stages: dict[int, StageLatencies] = {}
        self.count = 0

    def add(self, sample: run_service_pb2.ExportedSample) -> None:
        self.count += 1
        if sample.status != run_pb2.REQUEST_STATUS_OK or sample.warmup:
            return
        stage = self.stages.setdefault(sample.stage_index, StageLatencies())
        if sample.ttft_ms > 0:
            # The export's e2e_ms is the last token's time; it falls back to `done` only for a
            # response without text events, which has no TTFT either.
            stage.add(sample.ttft_ms, sample.e2e_ms, sample.output_tokens)
        if sample.first_reasoning_ms > 0:
            stage.ttfr_ms.append(sample.first_reasoning_ms)
            if sample.first_answer_ms > 0:
                stage.ttfo_ms.append(sample.first_answer_ms)


@dataclass
class RunReportData:
    """Everything the report shows of one run."""

    run: run_pb2.Run
    result: run_pb2.RunResult
    samples: SampleDigest | None = None  # None: samples not fetched or not available
    samples_note: str = ""
    # The history of the run's series (RunSpec.series); None when it has none.
    history: run_service_pb2.GetSeriesHistoryResponse | None = None


async def collect(client: ControllerClient, run_id: str, with_samples: bool = True) -> RunReportData:
    """A run's, or a group's (`grp_...`: its result, with the samples of its counted runs
    together in the distributions)."""
    if run_id.startswith(GROUP_ID_PREFIX):
        response = await client.get_group_result(run_id)
        run, result = group_as_run(response), response.result
        sources = list(result.group.counted_run_ids)
    else:
        run, result = await client.get_run(run_id), await client.get_result(run_id)
        sources = [run_id]
    data = RunReportData(run, result, history=await _history(client, run))
    if not with_samples:
        data.samples_note = "samples not fetched (--no-samples)"
        return data
    digest = SampleDigest()
    try:
        for source in sources:
            async for sample in client.export_samples(source, page_size=5000):
                digest.add(sample)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        data.samples_note = "the controller cannot export samples (ExportRunSamples: UNIMPLEMENTED)"
        return data
    data.samples = digest
    return data


async def _history(client: ControllerClient, run: run_pb2.Run) -> run_service_pb2.GetSeriesHistoryResponse | None:
    """The series' history, each run named by the run's first label (e.g. `commit`); None for a
    run of no series, or a controller that keeps no histories (UNIMPLEMENTED)."""
    if not run.spec.series:
        return None
    label = min(run.spec.labels) if run.spec.labels else ""
    try:
        return await client.series_history(run.spec.series, label=label)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return None
