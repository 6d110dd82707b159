"""Cumulative acks of sample batches: per assignment, the highest batch_seq committed with
no gap before it. An agent drops a batch only once an ack covers it, and replays every
unacked batch in order when it reconnects, so an ack never runs ahead of a commit."""

from __future__ import annotations


class AckTracker:
    """Highest batch_seq committed without gaps, per assignment (for cumulative acks)."""

    def __init__(self) -> None:
        self._through: dict[str, int] = {}
        self._ahead: dict[str, set[int]] = {}

    def commit(self, assignment_id: str, seq: int) -> int:
        """Record that batch `seq` is committed; returns the position to ack."""
        # The first batch this process sees of an assignment starts right after what the
        # agent has had acked (by us or a previous controller process): agents replay
        # every unacked batch in order, and drop batches only once they are acked.
        through = self._through.get(assignment_id, seq - 1)
        ahead = self._ahead.setdefault(assignment_id, set())
        if seq > through:
            ahead.add(seq)
        while through + 1 in ahead:
            through += 1
            ahead.discard(through)
        self._through[assignment_id] = through
        return through

    def through(self, assignment_id: str) -> int:
        """The ack position of an assignment (0 before its first commit here)."""
        return self._through.get(assignment_id, 0)

    def forget(self, assignment_id: str) -> None:
        self._through.pop(assignment_id, None)
        self._ahead.pop(assignment_id, None)
