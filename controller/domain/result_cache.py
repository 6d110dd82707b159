"""Computed results of finished runs, kept while their stored samples stay the same.

A result is a pure function of the run's stored batches, its spec and its final state; a
finished run's batches rarely change (a replay of late batches after an agent rejoins can
still add some). So a result is cached under a version — (state, number of stored batches,
highest batch pk) — and recomputed when the version read now differs. Reading the version is
one covering-index lookup; recomputing a 1M-sample run takes most of a second.
"""

from __future__ import annotations

from collections import OrderedDict

from controller.domain.results import RunOutcome

Version = tuple[int, int, int]
DEFAULT_MAX_RUNS = 16


class ResultCache:
    """Results of the most recently asked-for finished runs (least recently used leave first)."""

    def __init__(self, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        self._max_runs = max_runs
        self._entries: OrderedDict[int, tuple[Version, RunOutcome]] = OrderedDict()

    def get(self, run_pk: int, version: Version) -> RunOutcome | None:
        """The cached result of the run if it was computed at `version`."""
        entry = self._entries.get(run_pk)
        if entry is None or entry[0] != version:
            return None
        self._entries.move_to_end(run_pk)
        return entry[1]

    def put(self, run_pk: int, version: Version, outcome: RunOutcome) -> None:
        """Keep `outcome`, computed from the samples as they were at `version` (read before
        computing: a batch stored meanwhile only makes the entry look stale, never fresh)."""
        self._entries[run_pk] = (version, outcome)
        self._entries.move_to_end(run_pk)
        while len(self._entries) > self._max_runs:
            self._entries.popitem(last=False)

    def forget(self, run_pk: int) -> None:
        self._entries.pop(run_pk, None)
