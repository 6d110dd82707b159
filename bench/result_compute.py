"""The metric computation of a result (common/metrics.py), in process, before and after a change.

Times `compute_stage_metrics` on synthetic stages and `summarize` on the pooled gaps of the
largest one: a stage of `--samples` streamed requests (default 1M, 8 inter-token gaps each,
as bench/controller_queries.py), the same requests as 8 agents' rows, and small stages of
1,000 requests (where per-call costs, not passes over values, dominate).

With `--before REF` the same cases run in a `git archive` copy of REF too, in child
processes that alternate (before, after, before, ...), so both trees see the same machine
load; the table gives each tree's median and fastest call, and the ratios after / before.

    .venv/bin/python bench/result_compute.py --before main
    .venv/bin/python bench/result_compute.py --samples 200000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import ROOT, machine, table

CASES = ("stage", "8 agents", "summarize ITL", "20 small stages")


def _columns(n: int, gaps_each: int, seed: int) -> Any:
    """`n` streamed requests over 600 s, lognormal TTFT and gaps, one in 50 failed."""
    import numpy as np

    from common.metrics import SampleColumns

    rng = np.random.default_rng(seed)
    ms = 1_000_000
    sent = np.sort(rng.integers(0, 600 * 1_000_000_000, n))
    first = rng.lognormal(np.log(80 * ms), 0.5, n).astype(np.int64)
    gaps = rng.lognormal(np.log(12 * ms), 0.4, n * gaps_each).astype(np.int64)
    last = first + gaps.reshape(n, gaps_each).sum(axis=1)
    return SampleColumns(
        sent_unix_ns=1_700_000_000 * 1_000_000_000 + sent,
        queue_delay_ns=rng.integers(0, ms, n),
        first_token_ns=first,
        last_token_ns=last,
        done_ns=last + ms,
        prompt_tokens=rng.integers(100, 1000, n),
        output_tokens=np.full(n, gaps_each + 1),
        status=np.where(rng.random(n) < 0.02, 3, 1),
        flags=np.ones(n, dtype=np.int64),
        itl_count=np.full(n, gaps_each),
        itl_ns=gaps,
    )


def child(samples: int, gaps_each: int, repeat: int) -> dict[str, list[float]]:
    """Runs in the tree under test (its `common` first on sys.path): seconds per case."""
    import numpy as np

    from common import stats
    from common.metrics import compute_stage_metrics, summarize

    print(f"tree: {Path(stats.__file__).parent.parent}", file=sys.stderr)
    cols = _columns(samples, gaps_each, 1)
    small = [_columns(1000, gaps_each, 100 + i) for i in range(20)]
    agents = np.arange(samples) % 8
    parts = [cols.select(agents == a) for a in range(8)]
    cases = {
        "stage": lambda: compute_stage_metrics(cols),
        "8 agents": lambda: [compute_stage_metrics(p) for p in parts],
        "summarize ITL": lambda: summarize(cols.itl_ns),
        "20 small stages": lambda: [compute_stage_metrics(c) for c in small],
    }

    def cold_caches() -> None:
        """Empties common.stats' caches (t quantiles, ranks), as for a result never computed."""
        for value in vars(stats).values():
            getattr(value, "cache_clear", lambda: None)()

    out: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in cases.items():
        fn()  # the first call pays page faults of the first large allocations
        for _ in range(repeat):
            cold_caches()
            started = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - started)
    return out


def _tree(ref: str, into: str) -> Path:
    """A `git archive` copy of `ref` (only what the computation imports)."""
    archive = Path(into) / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "common"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return Path(into)


def _run_child(tree: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    cmd = [sys.executable, __file__, "--child", "--samples", str(args.samples)]
    cmd += ["--itl-per-sample", str(args.itl_per_sample), "--repeat", str(args.repeat)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    result: dict[str, list[float]] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000, help="requests in the large stage (%(default)s)")
    parser.add_argument("--itl-per-sample", type=int, default=8, help="gaps per request (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per tree, alternating (%(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per case in each child (%(default)s)")
    parser.add_argument("--before", metavar="REF", help="also time this git ref's tree (e.g. main)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(child(args.samples, args.itl_per_sample, args.repeat)))
        return
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"after": ROOT}
        if args.before:
            trees = {"before": _tree(args.before, tmp), "after": ROOT}
        times: dict[str, dict[str, list[float]]] = {name: {c: [] for c in CASES} for name in trees}
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                for case, values in _run_child(tree, args).items():
                    times[name][case] += values
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for case in CASES:
        medians = {name: statistics.median(times[name][case]) * 1000 for name in trees}
        fastest = {name: min(times[name][case]) * 1000 for name in trees}
        row = [case, *(f"{medians[name]:.1f} / {fastest[name]:.1f}" for name in trees)]
        if "before" in medians:
            row.append(f"{medians['after'] / medians['before']:.2f} / {fastest['after'] / fastest['before']:.2f}")
        rows.append(row)
    heads = ["case", *(f"{name} ms (median / min)" for name in trees)]
    heads += ["after / before (median / min)"] if args.before else []
    print(f"{args.samples:,} requests x {args.itl_per_sample} gaps; {args.rounds} rounds x {args.repeat} calls")
    print(table(heads, rows))


if __name__ == "__main__":
    main()
