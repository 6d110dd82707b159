"""Stalls: stretches of a stage in which no request could be sent and nothing came back.

A server that stops answering but keeps its connections open (llama-server holding its
streams for 30 s on SIGTERM, a frozen process) leaves a closed loop with every worker
waiting: no request is sent, yet nothing fails. `StallWatch` notices such stretches from
the assignment's activity, polled by the runner: the time of the last request sent or
finished and of the last response data of a request in flight. A request whose connection was
refused (`connect_failed`: the server stopped listening, as llama-server does on SIGTERM) was
never sent: its end is no activity, so the retries of workers whose streams ended do not hide
the stall of the others. A stall begins at the last
activity once `threshold_s` (5 s) passed without any while requests were in flight, and ends
at the next activity, or where the stage's sending window ends (after that no request is
due, so nothing "could not be sent"). Stalls of at least `threshold_s` are reported with the
assignment's final update and become run events.
"""

from __future__ import annotations

from dataclasses import dataclass

STALL_THRESHOLD_S = 5.0
# How often the runner polls: a stall's end is known to this precision.
STALL_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class Stall:
    """One stall, in `perf_counter_ns()` readings."""

    start_ns: int
    end_ns: int
    in_flight: int

    @property
    def length_s(self) -> float:
        """How long it lasted."""
        return (self.end_ns - self.start_ns) / 1e9


class StallWatch:
    """Turns polled activity into the assignment's stalls."""

    def __init__(self, window_end_ns: int | None, threshold_s: float = STALL_THRESHOLD_S) -> None:
        self._window_end_ns = window_end_ns
        self._threshold_ns = int(threshold_s * 1e9)
        self._open_start_ns = 0
        self._open_in_flight = 0
        self.stalls: list[Stall] = []

    def observe(self, now_ns: int, activity_ns: int, in_flight: int) -> None:
        """One poll: `activity_ns` is the latest activity, `in_flight` the requests in flight."""
        if self._open_start_ns:
            if activity_ns > self._open_start_ns:
                self._close(activity_ns)
            return
        window_end = self._window_end_ns
        if window_end is not None and activity_ns >= window_end:
            return
        if in_flight and now_ns - activity_ns >= self._threshold_ns:
            self._open_start_ns = activity_ns
            self._open_in_flight = in_flight

    def finish(self, now_ns: int) -> list[Stall]:
        """The stalls, the one still open (if any) ending now."""
        if self._open_start_ns:
            self._close(now_ns)
        return self.stalls

    def _close(self, end_ns: int) -> None:
        if self._window_end_ns is not None:
            end_ns = min(end_ns, self._window_end_ns)
        start_ns, self._open_start_ns = self._open_start_ns, 0
        if end_ns - start_ns >= self._threshold_ns:
            self.stalls.append(Stall(start_ns, end_ns, self._open_in_flight))
