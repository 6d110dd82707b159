"""The collector's thresholds while stages send load: raised, shared, and restored."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from agent.gcload import LOAD_THRESHOLDS, load_thresholds


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_raised_during_load_and_restored_after() -> None:
    with load_thresholds():
        assert gc.get_threshold() == LOAD_THRESHOLDS
    assert gc.get_threshold() == (700, 10, 10)


def test_overlapping_stages_restore_only_when_the_last_ends() -> None:
    first, second = load_thresholds(), load_thresholds()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == LOAD_THRESHOLDS  # the second stage is still running
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10)


def test_restored_when_the_stage_fails() -> None:
    with pytest.raises(RuntimeError), load_thresholds():
        raise RuntimeError("stage failed")
    assert gc.get_threshold() == (700, 10, 10)
