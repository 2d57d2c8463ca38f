"""proxy/deadlines.py: asyncio.timeout's semantics (on uvloop, as the proxy runs), one sweep timer."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from proxy.deadlines import RESOLUTION_S, _sweeper, deadline, deadline_at


def run(coro):
    return uvloop.run(coro)


def test_a_passed_deadline_raises_timeout_error_within_one_sweep():
    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            async with deadline(0.2):
                await asyncio.Event().wait()
        return loop.time() - start

    took = run(main())
    assert 0.2 - 0.002 <= took < 0.2 + RESOLUTION_S + 0.15, took  # uvloop keeps time in ms


def test_a_block_done_in_time_is_untouched_and_leaves_nothing_open():
    async def main() -> tuple[int, int]:
        async with deadline(5):
            await asyncio.sleep(0)
            value = 7
        await asyncio.sleep(RESOLUTION_S * 2)  # a sweep after it must not cancel the task
        return value, len(_sweeper(asyncio.get_running_loop()).open)

    assert run(main()) == (7, 0)


def test_a_cancellation_from_elsewhere_passes_through_as_cancelled_error():
    async def inner(started: asyncio.Event) -> None:
        async with deadline(5):
            started.set()
            await asyncio.Event().wait()

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(inner(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _sweeper(asyncio.get_running_loop()).open

    run(main())


def test_nested_deadlines_the_inner_fires_and_the_outer_goes_on():
    async def main() -> str:
        async with deadline(5):
            try:
                async with deadline(0.1):
                    await asyncio.Event().wait()
            except TimeoutError:
                pass
            await asyncio.sleep(RESOLUTION_S * 2)
            return "outer done"

    assert run(main()) == "outer done"


def test_none_is_no_deadline_and_a_deadline_in_the_past_fires_at_the_first_await():
    async def main() -> None:
        async with deadline(None):
            await asyncio.sleep(RESOLUTION_S * 1.5)
        with pytest.raises(TimeoutError):
            async with deadline_at(asyncio.get_running_loop().time() - 1):
                await asyncio.sleep(1)

    run(main())


def test_many_open_deadlines_each_fire_once():
    async def one(i: int) -> str:
        try:
            async with deadline(0.05 if i % 2 else 5):
                await asyncio.sleep(0.5 if i % 2 else 0)
            return "done"
        except TimeoutError:
            return "timeout"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = run(main())
    assert results.count("timeout") == 100 and results.count("done") == 100
