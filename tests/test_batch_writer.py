"""BatchWriter: a burst in one send, and a message alone without the scheduling rounds.

Covered: under load a burst goes out in one ``send_all`` after the writer's extra round; a
message alone at the writer's wake-up goes through the eager sender, and leaves the writer
quiet; on a quiet writer ``send_alone`` sends from the caller's task without a round, falls back
to the queue when the stream is busy, and a failure or a cancel mid-send surfaces from ``run``;
and in the pool, a lone query on a quiet connection never wakes the connection's writer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from dot_proxy.upstream.writer import BatchWriter
from tests.conftest import StartUpstream
from tests.fakes import ask, open_pool


class FakeEager:
    """An eager sender that records what it sent, and how."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.nowait: memoryview | BaseException | None = memoryview(b"")  # what it returns
        self.finish_forever = False
        self.finish_error: BaseException | None = None

    def send_nowait(self, data: bytes) -> memoryview | None:
        if isinstance(self.nowait, BaseException):
            raise self.nowait
        if self.nowait is not None:
            self.sent.append(("nowait", data))
        return self.nowait

    async def finish(self, rest: memoryview) -> None:
        assert rest, "called for nothing"
        if self.finish_error is not None:
            raise self.finish_error
        if self.finish_forever:
            await trio.sleep_forever()
        self.sent.append(("finish", bytes(rest)))

    async def send_all(self, data: bytes) -> None:
        self.sent.append(("send_all", data))
        await trio.lowlevel.checkpoint()


class Plain:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.sent.append(data)
        await trio.lowlevel.checkpoint()


class Rig:
    def __init__(self, *, busy: bool) -> None:
        self.plain = Plain()
        self.eager = FakeEager()
        self.busy = busy
        self.writer = BatchWriter(
            self.plain.send_all, busy=lambda _queued: self.busy, eager=self.eager
        )


@pytest.fixture
async def quiet_rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    rig = Rig(busy=False)
    nursery.start_soon(rig.writer.run)
    await trio.testing.wait_all_tasks_blocked()
    rig.writer.write_nowait(b"first")
    await trio.testing.wait_all_tasks_blocked()
    yield rig


async def test_under_load_a_burst_goes_in_one_send_all_and_the_writer_is_not_quiet(
    nursery: trio.Nursery,
) -> None:
    rig = Rig(busy=True)
    nursery.start_soon(rig.writer.run)
    await trio.testing.wait_all_tasks_blocked()
    for data in (b"a", b"b", b"c"):
        rig.writer.write_nowait(data)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.plain.sent == [b"abc"]
    assert rig.eager.sent == []
    assert not rig.writer.quiet


async def test_a_message_alone_at_the_wake_up_goes_eagerly_and_the_writer_is_quiet(
    quiet_rig: Rig,
) -> None:
    assert quiet_rig.eager.sent == [("send_all", b"first")]
    assert quiet_rig.plain.sent == []
    assert quiet_rig.writer.quiet


async def test_send_alone_on_a_quiet_writer_sends_from_the_caller_without_a_round(
    quiet_rig: Rig, nursery: trio.Nursery
) -> None:
    others_ran = False

    async def other() -> None:
        nonlocal others_ran
        others_ran = True

    nursery.start_soon(other)
    await quiet_rig.writer.send_alone(b"second")
    assert not others_ran
    assert quiet_rig.eager.sent[-1] == ("nowait", b"second")
    assert (quiet_rig.writer.messages, quiet_rig.writer.sends) == (2, 2)


async def test_send_alone_queues_when_the_stream_is_busy_sending(quiet_rig: Rig) -> None:
    quiet_rig.eager.nowait = None  # the stream's send lock is held
    await quiet_rig.writer.send_alone(b"second")
    await trio.testing.wait_all_tasks_blocked()
    assert quiet_rig.eager.sent[-1] == ("send_all", b"second")  # by the writer, in turn


async def test_what_the_kernel_left_over_is_finished_by_the_caller(quiet_rig: Rig) -> None:
    quiet_rig.eager.nowait = memoryview(b"nd")
    await quiet_rig.writer.send_alone(b"second")
    assert quiet_rig.eager.sent[-2:] == [("nowait", b"second"), ("finish", b"nd")]


async def _send_second_alone(rig: Rig, trouble: Callable[[FakeEager], None]) -> None:
    # The writer runs and goes quiet; then ``trouble`` hits the second message's send.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.writer.run)
        rig.writer.write_nowait(b"first")
        await trio.testing.wait_all_tasks_blocked()
        trouble(rig.eager)
        with trio.move_on_after(1):
            await rig.writer.send_alone(b"second")  # returns (or is cancelled); run raises


def _reset(eager: FakeEager) -> None:
    eager.nowait = trio.BrokenResourceError("reset")


def _stuck_with_a_rest(eager: FakeEager) -> None:
    eager.nowait, eager.finish_forever = memoryview(b"nd"), True


def _reset_mid_rest(eager: FakeEager) -> None:
    eager.nowait, eager.finish_error = memoryview(b"nd"), trio.BrokenResourceError("reset")


@pytest.mark.parametrize("trouble", [_reset, _reset_mid_rest], ids=["at-once", "mid-rest"])
async def test_a_failed_eager_send_is_raised_by_run_not_by_send_alone(
    trouble: Callable[[FakeEager], None],
) -> None:
    # send_alone returns (inside _send_second_alone): the query waits, and the owner, told by
    # run, retires the stream and fails it as one that broke, to be retried elsewhere.
    with pytest.RaisesGroup(pytest.RaisesExc(trio.BrokenResourceError, match="^reset$")):
        await _send_second_alone(Rig(busy=False), trouble)


async def test_a_cancel_while_the_rest_is_sent_breaks_the_writer() -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(trio.BrokenResourceError, match="write cut short")):
        await _send_second_alone(Rig(busy=False), _stuck_with_a_rest)


class _WriterSteps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._write_loop"):
            self.steps += 1


async def test_a_lone_query_on_a_quiet_connection_never_wakes_its_writer(
    start_upstream: StartUpstream, ca_file: str
) -> None:
    fake = await start_upstream()
    async with open_pool(fake, ca_file) as [upstream]:
        for warm in ("one", "two"):  # the writer finds each alone: the connection is quiet
            await ask(upstream, f"{warm}.writer.test.")
        steps = _WriterSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            answer = await ask(upstream, "lone.writer.test.")
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert answer.question[0].name.to_text() == "lone.writer.test."
    assert steps.steps == 0
