"""When the controller releases memory: past a growth over its start, and less often while
releases free little (the memory is in use)."""

from __future__ import annotations

import pytest

from controller.memory import MemoryReleaser

pytestmark = pytest.mark.timeout(30)


async def test_releases_past_the_growth_and_backs_off_when_futile() -> None:
    rss = [100.0]
    shrunk: list[float] = []

    async def shrink() -> None:
        shrunk.append(rss[0])
        rss[0] = max(100.0, rss[0] - freeable[0])

    freeable = [200.0]
    releaser = MemoryReleaser(shrink, check_s=0.0, growth_mb=32.0, rss_mb=lambda: rss[0])
    releaser.start()
    await releaser.stop()  # the loop is not needed: checks are driven here
    rss[0] = 120.0
    assert not await releaser.check()  # 20 MB above the start: nothing
    rss[0] = 300.0
    assert await releaser.check() and rss[0] == 100.0  # freed: back to the start
    freeable[0] = 0.0  # now the memory is in use
    rss[0] = 300.0
    assert await releaser.check()  # tried once, freed nothing: the wait doubles (from 0 s here)
    assert shrunk == [300.0, 300.0]


async def test_futile_releases_wait_longer() -> None:
    calls = []

    async def shrink() -> None:
        calls.append(1)  # frees nothing: the memory is in use

    rss = [50.0]
    releaser = MemoryReleaser(shrink, check_s=10.0, growth_mb=32.0, rss_mb=lambda: rss[0])
    releaser.start()
    await releaser.stop()
    rss[0] = 500.0
    assert await releaser.check()
    assert not await releaser.check()  # within the doubled wait (20 s): no second try
    assert calls == [1]
