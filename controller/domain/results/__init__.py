"""Results: samples in, figures out (docs/metrics.md).

* `ingest.py`: sample batches from the agent streams into the store, acked after the commit;
  `sample_limits.py`: what values a stored sample may hold.
* `live.py`: the live view of running runs (a trailing window) and the hub that wakes watchers.
* `compute.py`: a run's result from its stored samples: per stage and per agent, SLO goodput,
  checks (`checks.py`) and verdict, generator saturation, target saturation
  (`target_saturation.py`), the server-side view (`server_metrics.py`); `stage_split.py` splits a
  stage's samples by agent.
* `message.py`: that result packed as the API's `loadtest.v1.RunResult`.
* `provider.py`: `RunResults`, results as the API returns them (a final run's computed once and
  kept).
* `compare.py`: runs compared with a baseline, stage by stage.
"""
