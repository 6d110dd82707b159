"""Run execution: which agents run which run, stage by stage, and what happens when one of
them is lost (docs/fleet.md).

`coordinator.RunCoordinator` is the entry point: the servicers, `Runs` and the controller
process call its methods, and use no more of the package than the types those take and
give (`AgentSession` of `agents.py`, `AssignmentRefused` of `loss.py`). It is composed of
one part per job, over the state in `state.py`:

* `placement.py`: the queue of pending runs and which free agents each gets.
* `executor.py`: one run's task: preflight (`preflight.py`), its stages, its final state.
* `capacity.py`: a capacity search's probes, planned one at a time by the pure `search.py`.
* `stages.py`: one stage on its agents: synchronized start, waiting for every final report
  and batch, deadlines, cancel.
* `loss.py`: agents declared lost (heartbeats, disconnect grace) and rejoining ones;
  `takeover.py`: the run's loss policy (fail, continue, redistribute).
* `reports.py`: what agents report on their streams; acks (`acks.py`).
* `planning.py`: pure functions: shares of a stage, seeds, start lead, the rest of a lost share.
* `agents.py`: connected agent sessions and their registry; `events.py`: run events out.
"""
