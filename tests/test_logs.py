"""Access lines: the served proxy's handler writes the lines of one event-loop turn together, at the
turn's end; with any other handler on the access logger, each line is a record as before."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable

import pytest

from proxy import logs


class Stream:
    """A stream that keeps each write, and counts flushes."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        self.flushes += 1


async def turn_over() -> None:
    """Until the loop turn is over: a callback scheduled now runs after the write the handler
    scheduled for the turn's end (the loop runs its callbacks in order)."""
    over = asyncio.Event()
    asyncio.get_running_loop().call_soon(over.set)
    await over.wait()


@pytest.fixture
def access(monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[logs.TurnBufferedHandler, Stream]]:
    """Sets the access logger up as the served proxy does, writing to a `Stream`. Called in the
    test itself: pytest puts its capturing handlers on loggers once the fixtures have run."""

    def install() -> tuple[logs.TurnBufferedHandler, Stream]:
        stream = Stream()
        handler = logs.TurnBufferedHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger(logs.ACCESS_LOGGER)
        monkeypatch.setattr(logger, "handlers", [handler])
        monkeypatch.setattr(logger, "propagate", False)
        monkeypatch.setattr(logger, "level", logging.INFO)
        return handler, stream

    return install


def test_the_lines_of_one_loop_turn_go_out_in_one_write_at_its_end(access):
    _, stream = access()

    async def turns() -> list[list[str]]:
        seen = []
        for line in ("a", "b", "c"):
            logs.access_line(line)
        seen.append(list(stream.writes))  # nothing yet: the turn is not over
        await turn_over()
        seen.append(list(stream.writes))
        logs.access_line("d")
        await turn_over()
        seen.append(list(stream.writes))
        return seen

    assert asyncio.run(turns()) == [[], ["a\nb\nc\n"], ["a\nb\nc\n", "d\n"]]
    assert stream.flushes == 2


def test_off_the_event_loop_each_line_is_written_at_once(access):
    _, stream = access()
    logs.access_line("x")
    logging.getLogger(logs.ACCESS_LOGGER).info("y")  # a record, through the same handler
    assert stream.writes == ["x\n", "y\n"] and stream.flushes == 2


def test_lines_still_waiting_are_written_when_logging_shuts_down(access):
    handler, stream = access()

    async def log_and_stop() -> None:
        logs.access_line("last")
        logging.shutdown([weakref.ref(handler)])  # as at exit, before the turn's end

    asyncio.run(log_and_stop())
    assert stream.writes == ["last\n"]


def test_with_another_handler_on_the_access_logger_each_line_is_a_record(access, caplog):
    _, stream = access()
    with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
        logging.getLogger(logs.ACCESS_LOGGER).addHandler(caplog.handler)
        logs.access_line('{"decision":"allowed"}')
    assert [r.getMessage() for r in caplog.records if r.name == logs.ACCESS_LOGGER] == ['{"decision":"allowed"}']
    assert stream.writes == ['{"decision":"allowed"}\n']  # the proxy's own handler still gets it


def test_a_filter_on_the_access_logger_still_decides(access):
    _, stream = access()
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    drop_refusals = logging.Filter()
    drop_refusals.filter = lambda record: '"refused"' not in record.getMessage()  # type: ignore[method-assign]
    logger.addFilter(drop_refusals)
    try:
        logs.access_line('{"decision":"refused"}')
        logs.access_line('{"decision":"allowed"}')
    finally:
        logger.removeFilter(drop_refusals)
    assert stream.writes == ['{"decision":"allowed"}\n']


def test_access_lines_switched_off_are_not_written(access):
    _, stream = access()
    logging.disable(logging.INFO)
    try:
        logs.access_line("x")
    finally:
        logging.disable(logging.NOTSET)
    assert stream.writes == []


def test_a_stream_that_fails_is_reported_once_a_turn_and_the_loop_goes_on(access, monkeypatch, capsys):
    handler, stream = access()

    def broken(text: str) -> None:
        raise BrokenPipeError("stdout is gone")

    monkeypatch.setattr(stream, "write", broken)
    monkeypatch.setattr(logging, "raiseExceptions", True)

    async def log_two_turns() -> None:
        for _ in range(2):
            logs.access_line("x")
            logs.access_line("y")
            await turn_over()

    asyncio.run(log_two_turns())
    assert capsys.readouterr().err.count("BrokenPipeError: stdout is gone") == 2
    assert handler.lines == []
