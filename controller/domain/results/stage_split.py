"""Splitting a stage's samples by agent without a mask pass per agent.

Every batch belongs to one agent, so each agent's samples are contiguous runs; a stage read
for results (`repository.load_stage_samples`) comes agent by agent, one run each, and an
agent's part is then a slice of the stage's arrays, no copy. Any other order works too:
runs are gathered (each sample copied once), where `SampleColumns.select(agent == i)` would
scan every sample and every gap once per agent (measured on a 1M-sample result with 8 agents:
BENCHMARKS.md, section 6).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np
import numpy.typing as npt

from common.metrics import SampleColumns, Slo, StageMetrics, compute_stage_metrics, is_zero_column
from controller.store.repository import StageSamples

# One thread for the whole-stage half of `stage_and_agent_metrics` (callers are read-pool threads).
_STAGE_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-metrics")

_PER_REQUEST = tuple(f.name for f in dataclasses.fields(SampleColumns) if f.name != "itl_ns")
_NONE = np.zeros(0, dtype=np.int64)


def split_by_group(cols: SampleColumns, group: npt.NDArray[np.int64], n_groups: int) -> list[SampleColumns]:
    """The samples of each group 0..n_groups-1 (in their stored order), with their gaps;
    `group` gives each sample's group. Equals `[cols.select(group == g) for g in ...]`."""
    n = len(cols)
    if n == 0:
        return [cols for _ in range(n_groups)]
    # Runs of equal group: [starts[k], ends[k]) belongs to run_group[k].
    starts = np.concatenate(([0], np.flatnonzero(group[1:] != group[:-1]) + 1))
    ends = np.append(starts[1:], n)
    run_group = group[starts]
    gap_at = np.concatenate(([0], np.cumsum(cols.itl_count)))  # first gap of sample i
    out = []
    for g in range(n_groups):
        mine = np.flatnonzero(run_group == g)
        s, e = starts[mine].tolist(), ends[mine].tolist()
        # An all-0 optional column (no reasoning, no conversation) stays unstored in each part.
        parts = {
            name: _NONE if is_zero_column(column := getattr(cols, name)) else _gather(column, s, e)
            for name in _PER_REQUEST
        }
        out.append(SampleColumns(**parts, itl_ns=_gather(cols.itl_ns, gap_at[s].tolist(), gap_at[e].tolist())))
    return out


def stage_and_agent_metrics(data: StageSamples, slo: Slo | None) -> tuple[StageMetrics, list[tuple[str, StageMetrics]]]:
    """The stage's metrics and, with more than one agent, each agent's.

    With several agents the whole stage is computed on a second thread while this one splits
    and computes the agents: numpy's large passes release the GIL, so on two cores the two
    overlap (measured: BENCHMARKS.md, "Results stored when a run ends").
    """
    if len(data.agent_names) <= 1:
        return compute_stage_metrics(data.columns, slo), []
    whole = _STAGE_THREAD.submit(compute_stage_metrics, data.columns, slo)
    parts = split_by_group(data.columns, data.agent, len(data.agent_names))
    agents = [(name, compute_stage_metrics(part, slo)) for name, part in zip(data.agent_names, parts, strict=True)]
    return whole.result(), agents


def _gather(values: npt.NDArray[np.int64], starts: list[int], ends: list[int]) -> npt.NDArray[np.int64]:
    if len(starts) == 1:
        return values[starts[0] : ends[0]]
    if not starts:
        return values[:0]
    return np.concatenate([values[a:b] for a, b in zip(starts, ends, strict=True)])
