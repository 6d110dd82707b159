"""The run API in domain terms: create, read, list, cancel, delete, results, live view, and
groups of repeats (CreateRunRequest.repeat: created together, each with its own seed; a
cancelled repeat cancels the later ones; the group's result from controller/domain/results/groups.py).

Servicers call these methods with plain values and protobuf messages (the spec is
data); nothing here knows about gRPC.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

import structlog

from common.codes import RunState
from common.datasets import format_name
from common.proto.loadtest.v1 import run_pb2
from common.stats import DEFAULT_CONFIDENCE_PERCENT, MAX_CONFIDENCE_PERCENT, MIN_CONFIDENCE_PERCENT
from controller.domain.access.destinations import DestinationPolicy
from controller.domain.access.secrets import split_secrets
from controller.domain.datasets import content_digest, entries_to_json, parse_dataset
from controller.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from controller.domain.execution.agents import AgentSession
from controller.domain.execution.coordinator import RunCoordinator
from controller.domain.paging import decode_page_token, encode_page_token
from controller.domain.results.compare import (
    DEFAULT_TOLERANCE_PERCENT,
    METRICS,
    METRICS_BY_NAME,
    Comparison,
    compare_runs,
)
from controller.domain.results.groups import GroupMember, group_result
from controller.domain.results.live import LiveSnapshot, RunHub
from controller.domain.results.provider import RunResults
from controller.domain.spec import check_resume, check_stored_size, parse_spec, spec_json, validate_and_default
from controller.domain.uploads import DatasetLibrary
from controller.store import repository as repo
from controller.store.interface import Store

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A ListRuns page ends before its stored specs pass this many bytes (one spec is at most
# MAX_STORED_SPEC_BYTES, so a page holds at least 8 runs): far below the 4 MiB most gRPC clients
# accept, and a bounded slice of the controller's time to build and send.
MAX_PAGE_BYTES = 1024 * 1024
CANCEL_WAIT_S = 10.0
DEFAULT_EXPORT_PAGE = 1000
MAX_EXPORT_PAGE = 10_000
MAX_COMPARED = 10
MAX_REPEAT = 100
GROUP_ID_PREFIX = "grp_"
_GROUP_ID = re.compile(GROUP_ID_PREFIX + r"[0-9a-f]{20}")
_SEEDS = 2**64 - 1  # a seed is a uint64 other than 0 ("pick one")


def state_name(state: int) -> str:
    return run_pb2.RunState.Name(state)  # type: ignore[arg-type]


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex[:20]}"


def new_group_id() -> str:
    return f"{GROUP_ID_PREFIX}{uuid.uuid4().hex[:20]}"


def is_group_id(run_id: str) -> bool:
    """Whether an id given where a run's is expected names a group of repeats instead."""
    return run_id.startswith(GROUP_ID_PREFIX)


def check_group_id(group_id: str, field: str = "group_id") -> None:
    """INVALID_ARGUMENT unless `group_id` looks like one this controller makes."""
    if not group_id:
        raise InvalidArgument([FieldViolation(field, "required")])
    if not _GROUP_ID.fullmatch(group_id):
        raise InvalidArgument([FieldViolation(field, f"not a group id (grp_ and 20 hex digits): {group_id[:64]!r}")])


def repeat_seeds(seed: int, chosen: bool, repeats: int, rng: random.Random | None = None) -> list[int]:
    """The seed of each repeat of a group: the spec's seed plus the repeat index when the spec
    set one (`chosen`; wrapping within 1..2**64-1), else `seed` (picked at validation) for the
    first and a fresh random one for each other."""
    if chosen:
        return [(seed - 1 + i) % _SEEDS + 1 for i in range(repeats)]
    pick = rng or random.SystemRandom()
    return [seed, *(pick.randrange(1, 2**63) for _ in range(repeats - 1))]


class Runs:
    """Domain operations on runs."""

    def __init__(
        self,
        store: Store,
        coordinator: RunCoordinator,
        hub: RunHub,
        results: RunResults,
        destinations: DestinationPolicy,
        datasets: DatasetLibrary | None = None,
    ) -> None:
        self._store = store
        self._datasets = datasets if datasets is not None else DatasetLibrary(store)
        self._destinations = destinations
        self._coordinator = coordinator
        self.hub = hub
        self._results = results

    async def create(self, spec: run_pb2.RunSpec, request_id: str, repeat: int = 0) -> list[repo.RunRecord]:
        """A new run, or with `repeat` 2 to 100 a group of that many (in repeat order); with a
        `request_id` used before, what that call created."""
        if len(request_id) > 128:
            raise InvalidArgument([FieldViolation("request_id", "at most 128 characters")])
        if repeat > MAX_REPEAT:
            raise InvalidArgument([FieldViolation("repeat", f"at most {MAX_REPEAT} (0 or 1: a single run)")])
        if repeat > 1 and spec.HasField("search"):
            raise InvalidArgument(
                [FieldViolation("repeat", "repeats of a capacity search are not supported (spec.search is set)")]
            )
        seed_chosen = spec.workload.seed != 0
        valid = validate_and_default(spec)
        if valid.search.resume_from_run_id:
            check_resume(valid, await self._store.get_run(valid.search.resume_from_run_id))
        refused = await self._destinations.violations(valid)
        if refused:
            raise InvalidArgument(refused)
        # The API key and credential headers are stored apart (run_secrets), erased when the run ends.
        secret = split_secrets(valid.target)
        dataset_json = ""
        await self._resolve_uploads(valid.workload)
        if valid.workload.HasField("dataset") and not valid.workload.dataset.dataset_id:
            dataset = valid.workload.dataset
            entries = parse_dataset(dataset)
            dataset_json = entries_to_json(entries)
            dataset.content_sha256 = content_digest(dataset.content)
            dataset.entry_count = len(entries)
            dataset.content = ""  # the parsed entries are stored apart
        check_stored_size(valid)
        stage_names = [s.name for s in valid.stages]
        if repeat > 1:
            return await self._create_group(valid, seed_chosen, repeat, request_id, stage_names, secret, dataset_json)
        record, created = await self._store.insert_run(
            new_run_id(),
            request_id or None,
            valid.display_name,
            valid.target.model,
            spec_json(valid),
            stage_names,
            secret,
            time.time_ns(),
            dataset_json,
            valid.SerializeToString(deterministic=True),
            valid.series,
        )
        if created:
            await self._created(record, "", len(stage_names))
        return [record]

    async def _resolve_uploads(self, workload: run_pb2.Workload) -> None:
        """Check the workload's references to uploaded datasets (they must exist, of the right
        kind of format) and fill their output-only fields. The agents fetch the content."""
        if workload.HasField("dataset") and workload.dataset.dataset_id:
            dataset = workload.dataset
            field = "spec.workload.dataset"
            if dataset.content:
                raise InvalidArgument([FieldViolation(f"{field}.content", "set content or dataset_id, not both")])
            record = await self._datasets.resolve(dataset.dataset_id, "dataset", f"{field}.dataset_id")
            if dataset.format and dataset.format != record.format:
                raise InvalidArgument(
                    [
                        FieldViolation(
                            f"{field}.format", f"the dataset {record.dataset_id} is {format_name(record.format)}"
                        )
                    ]
                )
            if dataset.max_prompt_words and dataset.min_prompt_words > dataset.max_prompt_words:
                raise InvalidArgument([FieldViolation(f"{field}.min_prompt_words", "exceeds max_prompt_words")])
            dataset.format = record.format  # type: ignore[assignment]
            dataset.content_sha256 = record.sha256
            dataset.entry_count = record.entry_count  # before the word filters (the agents apply them)
            if not dataset.name:
                dataset.name = record.name
        if workload.HasField("trace"):
            trace = workload.trace
            record = await self._datasets.resolve(trace.dataset_id, "trace", "spec.workload.trace.dataset_id")
            trace.entry_count = record.entry_count
            speed = trace.replay_speed if trace.replay_speed > 0 else 1.0
            trace.span.FromNanoseconds(round(record.span_s / speed * 1e9))
        if workload.tokenizer_id:
            await self._datasets.resolve(workload.tokenizer_id, "tokenizer", "spec.workload.tokenizer_id")

    async def _create_group(
        self,
        valid: run_pb2.RunSpec,
        seed_chosen: bool,
        repeat: int,
        request_id: str,
        stage_names: list[str],
        secret: str,
        dataset_json: str,
    ) -> list[repo.RunRecord]:
        repeats: list[repo.NewRepeat] = []
        for seed in repeat_seeds(valid.workload.seed, seed_chosen, repeat):
            one = run_pb2.RunSpec()
            one.CopyFrom(valid)
            one.workload.seed = seed  # each run's stored spec shows its own seed
            repeats.append(repo.NewRepeat(new_run_id(), spec_json(one), one.SerializeToString(deterministic=True)))
        group_id = new_group_id()
        records, created = await self._store.insert_group(
            group_id,
            request_id or None,
            valid.display_name,
            valid.target.model,
            repeats,
            stage_names,
            secret,
            time.time_ns(),
            dataset_json,
            valid.series,
        )
        if created:
            for record in records:
                message = f"repeat {record.repeat_index + 1} of {repeat} in group {group_id}"
                await self._created(record, message, len(stage_names))
        return records

    async def _created(self, record: repo.RunRecord, message: str, stages: int) -> None:
        await self._store.add_event(record.pk, "run_created", message, record.created_at)
        log.info(
            "run_created",
            run_id=record.run_id,
            model=record.model,
            stages=stages,
            group_id=record.group_id or None,
            repeat_index=record.repeat_index,
        )
        self._coordinator.enqueue(record.run_id)

    async def group(self, group_id: str) -> tuple[list[repo.RunRecord], run_pb2.RunResult]:
        """A group's runs (in repeat order) and its result: every figure over its SUCCEEDED
        runs (controller/domain/results/groups.py)."""
        check_group_id(group_id)
        records = await self._store.list_group(group_id)
        if not records:
            raise NotFound(f"group {group_id!r} not found")
        members = [
            GroupMember(
                r.run_id,
                r.repeat_index,
                r.state,
                r.state_reason,
                await self._results.get(r) if r.state == RunState.SUCCEEDED else None,
            )
            for r in records
        ]
        checks = [(c.expression, c.abort_on_fail) for c in parse_spec(records[0]).checks]
        return records, group_result(group_id, members, checks)

    async def group_result(self, group_id: str) -> run_pb2.RunResult:
        """The result of a group of repeats (GetGroupResult's `result`)."""
        return (await self.group(group_id))[1]

    async def get(self, run_id: str) -> repo.RunRecord:
        if not run_id:
            raise InvalidArgument([FieldViolation("run_id", "required")])
        record = await self._store.get_run(run_id)
        if record is None:
            raise NotFound(f"run {run_id!r} not found")
        return record

    async def list_runs(
        self,
        page_size: int,
        page_token: str,
        state: int,
        model: str,
        build: Callable[[list[repo.RunRecord], str], T],
        series: str = "",
        group_id: str = "",
    ) -> T:
        """A page of runs and the next page's token, passed to `build` on the reader thread (a
        page's conversion stays off the event loop and costs no second thread hop)."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else None
        if state and state not in run_pb2.RunState.values():
            raise InvalidArgument([FieldViolation("state", f"unknown run state {state}")])
        if group_id:
            check_group_id(group_id)

        def page(records: list[repo.RunRecord], cursor: tuple[int, int] | None) -> T:
            return build(records, encode_page_token(cursor) if cursor else "")

        return await self._store.list_runs(size, after, state, model, MAX_PAGE_BYTES, page, series, group_id)

    async def cancel(self, run_id: str, reason: str) -> repo.RunRecord:
        record = await self.get(run_id)
        if record.is_final:
            raise FailedPrecondition(f"run {run_id} already finished ({state_name(record.state)})")
        reason = reason[:500] or "cancelled by user"
        if record.group_id:
            # Before this one ends: the next repeat starts as soon as it has.
            await self._cancel_later_repeats(record)
        if self._coordinator.withdraw(run_id) or record.state == RunState.PENDING:
            await self._store.finish_run(record.pk, RunState.CANCELLED, reason, time.time_ns())
            await self._coordinator.add_event(run_id, record.pk, "run_cancelled", reason)
            log.info("run_cancelled", run_id=run_id, reason=reason)
            self._results.run_finished(run_id)
        else:
            # Wait (bounded) for agents to stop and flush, so the answer is final.
            await self._coordinator.cancel_running(run_id, reason, wait_s=CANCEL_WAIT_S)
        return await self.get(run_id)

    async def _cancel_later_repeats(self, record: repo.RunRecord) -> None:
        """Cancel the repeats after `record` in its group that have not started."""
        reason = f"group {record.group_id} cancelled: its repeat {record.repeat_index} ({record.run_id}) was cancelled"
        for later in await self._store.list_group(record.group_id):
            if later.repeat_index <= record.repeat_index or later.state != RunState.PENDING:
                continue
            self._coordinator.withdraw(later.run_id)
            await self._coordinator.add_event(later.run_id, later.pk, "run_cancelled", reason)
            await self._store.finish_run(later.pk, RunState.CANCELLED, reason, time.time_ns())
            log.info("run_cancelled", run_id=later.run_id, reason=reason)
            self._results.run_finished(later.run_id)
            self.hub.notify(later.run_id)

    async def delete(self, run_id: str) -> None:
        record = await self.get(run_id)
        if not record.is_final:
            raise FailedPrecondition(f"run {run_id} is {state_name(record.state)}; cancel it first")
        await self._store.delete_run(record.pk)
        self._results.forget(record.run_id)
        log.info("run_deleted", run_id=run_id)
        self.hub.notify(run_id)

    async def result(self, run_id: str) -> tuple[repo.RunRecord, run_pb2.RunResult]:
        """The run's result as the API message; a final run's is stored once computed
        (controller/domain/results/provider.py) and shared: read it, don't modify it."""
        record = await self.get(run_id)
        return record, await self._results.get(record)

    async def export(
        self, run_id: str, page_size: int, include_warmup: bool
    ) -> AsyncIterator[list[tuple[object, ...]]]:
        """Pages of stored samples in storage order (rowid keyset, so pages never overlap)."""
        record = await self.get(run_id)
        size = min(page_size or DEFAULT_EXPORT_PAGE, MAX_EXPORT_PAGE)
        after = 0
        while True:
            rows = await self._store.export_page(record.pk, after, size, include_warmup)
            if not rows:
                return
            yield rows
            after = int(rows[-1][0])  # type: ignore[call-overload]

    async def compare(
        self,
        baseline_id: str,
        run_ids: list[str],
        tolerance_percent: float,
        confidence_percent: float = 0.0,
        metrics: Sequence[str] = (),
    ) -> Comparison:
        """Each of `run_ids` against the baseline (docs/metrics.md, "Comparing runs"); 0 for
        the tolerance or the confidence means the default, no `metrics` every metric."""
        if not run_ids or len(run_ids) > MAX_COMPARED:
            raise InvalidArgument([FieldViolation("run_ids", f"give 1 to {MAX_COMPARED} runs to compare")])
        if not 0 <= tolerance_percent <= 1000:  # also rejects NaN
            raise InvalidArgument([FieldViolation("tolerance_percent", "must be between 0 and 1000")])
        confidence = confidence_percent or DEFAULT_CONFIDENCE_PERCENT
        if not MIN_CONFIDENCE_PERCENT <= confidence <= MAX_CONFIDENCE_PERCENT:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "confidence_percent",
                        f"must be between {MIN_CONFIDENCE_PERCENT:g} and {MAX_CONFIDENCE_PERCENT:g} "
                        f"(default {DEFAULT_CONFIDENCE_PERCENT:g})",
                    )
                ]
            )
        unknown = [name for name in metrics if name not in METRICS_BY_NAME]
        if unknown:
            raise InvalidArgument(
                [FieldViolation("metrics", f"unknown metric {', '.join(unknown)}; one of {', '.join(METRICS_BY_NAME)}")]
            )
        chosen = [m for m in METRICS if m.name in metrics] if metrics else list(METRICS)
        base = await self.comparable_result(baseline_id)
        others = [await self.comparable_result(run_id) for run_id in run_ids]
        tolerance = tolerance_percent or DEFAULT_TOLERANCE_PERCENT
        return Comparison(base.run_id, confidence, compare_runs(base, others, tolerance, confidence, chosen))

    async def comparable_result(self, run_id: str) -> run_pb2.RunResult:
        """The result a comparison reads for `run_id`: a run's stored result, or a group's."""
        if is_group_id(run_id):
            return await self.group_result(run_id)
        return (await self.result(run_id))[1]

    async def events(self, record: repo.RunRecord, after_pk: int) -> list[repo.EventRecord]:
        return await self._store.list_events(record.pk, after_pk)

    def live(self, run_id: str) -> LiveSnapshot | None:
        return self._coordinator.live_snapshot(run_id)

    def agents(self) -> list[AgentSession]:
        return self._coordinator.agents()
