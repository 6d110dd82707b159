"""What run execution tells the rest of the controller: a run's events (stored, watchers
woken), that a run changed (watchers woken), and that a run reached its final state (its
result is then computed and stored: controller/domain/results/provider.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from controller.domain.results.live import RunHub
from controller.store.interface import Store


class RunEvents:
    """The outward side of run execution, shared by all its parts."""

    def __init__(self, store: Store, hub: RunHub, on_run_final: Callable[[str], None]) -> None:
        self._store = store
        self._hub = hub
        self._on_run_final = on_run_final

    async def add(self, run_id: str, run_pk: int, kind: str, message: str) -> None:
        """Store a run event and wake the run's watchers."""
        await self._store.add_event(run_pk, kind, message, time.time_ns())
        self._hub.notify(run_id)

    def changed(self, run_id: str) -> None:
        """Wake the run's watchers (new samples, a new state)."""
        self._hub.notify(run_id)

    def final(self, run_id: str) -> None:
        """The run's final state is committed."""
        self._on_run_final(run_id)
