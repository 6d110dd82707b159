"""The garbage collector while the agent sends load.

At hundreds of streams every request in flight holds a few dozen container objects
(aiohttp's request and response, futures, timer handles, coroutine frames) for as long as it
streams, so the collector's young generations fill with objects that are still alive. With
CPython's default thresholds (700, 10, 10) it walks them every few hundred allocations, every
tenth time a generation of ~20k live objects, and now and then everything: pauses long enough
at 512 streams to show, since every stream whose bytes arrive waits, in the TTFT and ITL tails
(BENCHMARKS.md, "Garbage collection under load").

While any stage runs, the thresholds are raised (`LOAD_THRESHOLDS`): collections stay, so
reference cycles are still freed and memory stays bounded, but they are a few hundred times
rarer, and the pauses with them (measured: the same entry). The previous thresholds come back
when the last running stage ends.

Before any of that, `freeze_startup()` moves what start-up built (modules, the session,
the channel) out of the collected generations: the full collections that still happen then
have far fewer objects to walk (their pauses without it: BENCHMARKS.md, section 2).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# gen0 after this many net allocations of container objects, gen1 every 20 of those, a full
# collection every 100 gen1 ones (and then only when it has a quarter more to look at).
LOAD_THRESHOLDS = (100_000, 20, 100)

_active = 0
_saved: tuple[int, int, int] | None = None


def freeze_startup() -> None:
    """Collect once, then keep everything alive now out of every later collection."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def load_thresholds() -> Iterator[None]:
    """Raise the collector's thresholds for the duration (nested and concurrent uses share)."""
    global _active, _saved  # noqa: PLW0603 - one process-wide setting, shared by every stage
    if _active == 0:
        _saved = gc.get_threshold()
        gc.set_threshold(*LOAD_THRESHOLDS)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if _active == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None
