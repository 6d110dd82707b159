"""Splitting a stage's samples by agent: the same as a mask select per agent."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.metrics import SampleColumns
from controller.domain.results.stage_split import split_by_group


def _columns(rng: np.random.Generator, n: int) -> SampleColumns:
    itl_count = rng.integers(0, 4, size=n)
    fields = {f.name: rng.integers(0, 10**6, size=n) for f in dataclasses.fields(SampleColumns)}
    fields["itl_count"] = itl_count
    fields["itl_ns"] = rng.integers(1, 10**6, size=int(itl_count.sum()))
    return SampleColumns(**fields)


@pytest.mark.parametrize("seed", range(6))
def test_split_equals_select(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    cols = _columns(rng, n)
    groups = int(rng.integers(1, 5))
    # Runs of one group, as batches of one agent each arrive interleaved.
    group = np.repeat(rng.integers(0, groups, size=n), rng.integers(1, 20, size=n))[:n].astype(np.int64)
    parts = split_by_group(cols, group, groups)
    assert len(parts) == groups
    for g, part in enumerate(parts):
        expected = cols.select(group == g)
        for f in dataclasses.fields(SampleColumns):
            assert np.array_equal(getattr(part, f.name), getattr(expected, f.name)), (g, f.name)
