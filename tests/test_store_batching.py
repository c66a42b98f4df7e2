"""Group commit: begin_run/finish_run calls that arrive together share one
transaction and one thread hop, and each caller still gets its own answer.

The first part drives :class:`netra.store._batch.GroupCommit` with a work
function of the test's own (a valve that holds each batch in its worker
thread until the test lets it go), so queueing, cancellation, deadlines and
batch bounds are exercised exactly. The second part runs the real SQL
stores: many concurrent runs take fewer transactions than writes, a write
that fails in a batch is undone alone, a transaction that fails fails every
write of it, and a caller cancelled while queued leaves nothing behind.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import pytest
import trio

from netra.errors import NotFound, StoreError
from netra.store import Store
from netra.store._batch import Call, GroupCommit, Result
from netra.store._gate import Gate

from ._backends import Backend, uid
from .test_store import IO_TIMEOUT, opened, outcome_of, start_of

# -- the batcher alone ----------------------------------------------------------


@attrs.define(eq=False)
class Valve:
    """Work for GroupCommit: each call ``(op, args)`` comes to ``op(*args)``
    (an exception raised by op is that call's own), every batch is recorded,
    and each batch waits in its worker thread for one :meth:`release`."""

    batches: list[list[Any]] = attrs.field(factory=list)
    entered: trio.Event = attrs.field(factory=trio.Event)
    _permits: threading.Semaphore = attrs.field(factory=lambda: threading.Semaphore(0))

    def __call__(self, calls: list[Call]) -> list[Result]:
        self.batches.append([args[0] for _, args in calls])
        trio.from_thread.run_sync(self.entered.set)
        if not self._permits.acquire(timeout=IO_TIMEOUT):
            raise AssertionError("the test never released this batch")
        results: list[Result] = []
        for op, args in calls:
            try:
                results.append((op(*args), None))
            except Exception as exc:  # noqa: BLE001  (the call's own failure)
                results.append((None, exc))
        return results

    def release(self, batches: int = 1) -> None:
        self._permits.release(batches)

    async def wait_entered(self) -> None:
        await self.entered.wait()
        self.entered = trio.Event()


def echo(value: Any) -> Any:
    return value


def refuse(value: Any) -> Any:
    raise NotFound(f"no {value}")


def committer(valve: Valve, *, timeout_s: float = IO_TIMEOUT, max_batch: int = 64) -> GroupCommit:
    return GroupCommit(Gate(2, timeout_s), valve, max_batch=max_batch)


async def submit_all(nursery: trio.Nursery, commits: GroupCommit, calls: list[tuple[Callable[..., Any], Any]],
                     outcomes: dict[Any, Any]) -> None:  # fmt: skip
    """Submit each (op, value) in a task of its own; outcomes[value] is what it got."""

    async def one(op: Callable[..., Any], value: Any) -> None:
        try:
            outcomes[value] = await commits.submit(op, value)
        except Exception as exc:  # noqa: BLE001
            outcomes[value] = exc

    for op, value in calls:
        nursery.start_soon(one, op, value)
    await trio.testing.wait_all_tasks_blocked()


async def test_writes_that_arrive_during_a_batch_share_the_next_one() -> None:
    valve = Valve()
    commits = committer(valve)
    outcomes: dict[Any, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await submit_all(nursery, commits, [(echo, "first")], outcomes)
            await valve.wait_entered()
            await submit_all(nursery, commits, [(echo, i) for i in range(10)], outcomes)
            valve.release()
            await valve.wait_entered()
            valve.release()
    assert valve.batches[0] == ["first"] and sorted(valve.batches[1]) == list(range(10))
    assert outcomes == {"first": "first", **{i: i for i in range(10)}}
    assert (commits.writes, commits.batches) == (11, 2)


async def test_batches_are_bounded() -> None:
    valve = Valve()
    commits = committer(valve, max_batch=4)
    outcomes: dict[Any, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await submit_all(nursery, commits, [(echo, "first")], outcomes)
            await valve.wait_entered()
            await submit_all(nursery, commits, [(echo, i) for i in range(10)], outcomes)
            valve.release(4)
    assert [len(b) for b in valve.batches] == [1, 4, 4, 2]
    assert sorted(v for b in valve.batches[1:] for v in b) == list(range(10))
    assert len(outcomes) == 11


async def test_each_caller_gets_its_own_failure() -> None:
    valve = Valve()
    commits = committer(valve)
    outcomes: dict[Any, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await submit_all(nursery, commits, [(echo, "first")], outcomes)
            await valve.wait_entered()
            await submit_all(nursery, commits, [(echo, "a"), (refuse, "b"), (echo, "c")], outcomes)
            valve.release(2)
    assert len(valve.batches[1]) == 3
    assert (outcomes["a"], outcomes["c"]) == ("a", "c")
    assert isinstance(outcomes["b"], NotFound) and outcomes["b"].message == "no b"


async def test_a_failed_transaction_fails_each_of_its_writes() -> None:
    def broken(calls: list[Call]) -> list[Result]:
        raise StoreError("the database is unavailable")

    commits = GroupCommit(Gate(1, IO_TIMEOUT), broken)
    outcomes: dict[Any, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await submit_all(nursery, commits, [(echo, i) for i in range(5)], outcomes)
    errors = list(outcomes.values())
    assert all(isinstance(e, StoreError) and e.message == "the database is unavailable" for e in errors)
    assert len({id(e) for e in errors}) == 5  # one exception per caller: no shared tracebacks


async def test_a_caller_cancelled_while_queued_writes_nothing() -> None:
    valve = Valve()
    commits = committer(valve)
    outcomes: dict[Any, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await submit_all(nursery, commits, [(echo, "first")], outcomes)
            await valve.wait_entered()
            cancelled = trio.CancelScope()

            async def doomed() -> None:
                with cancelled:
                    await commits.submit(echo, "doomed")
                    outcomes["doomed"] = "written"

            nursery.start_soon(doomed)
            await submit_all(nursery, commits, [(echo, "kept")], outcomes)
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert cancelled.cancelled_caught  # at once, not when the batch in flight ends
            valve.release(2)
    assert valve.batches == [["first"], ["kept"]]
    assert outcomes == {"first": "first", "kept": "kept"}


async def test_a_caller_cancelled_once_taken_still_gets_its_result() -> None:
    """A write already in a batch is seen through: the caller gets its result
    (a begin_run written must be known to its run), and the cancellation
    lands at its next checkpoint."""
    valve = Valve()
    commits = committer(valve)
    got: list[Any] = []
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            outcomes: dict[Any, Any] = {}
            await submit_all(nursery, commits, [(echo, "first")], outcomes)
            await valve.wait_entered()
            scopes = {name: trio.CancelScope() for name in ("leader", "taken")}

            async def caller(name: str) -> None:
                with scopes[name]:
                    got.append(await commits.submit(echo, name))
                    await trio.lowlevel.checkpoint()
                    got.append("not cancelled")  # pragma: no cover

            nursery.start_soon(caller, "leader")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(caller, "taken")
            await trio.testing.wait_all_tasks_blocked()
            valve.release()  # "first" done: "leader" leads and takes "taken"
            await valve.wait_entered()
            assert sorted(valve.batches[-1]) == ["leader", "taken"]
            for scope in scopes.values():
                scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # both wait for their batch
            valve.release()
    assert sorted(got) == ["leader", "taken"]
    assert all(scope.cancelled_caught for scope in scopes.values())
    assert (commits.writes, commits.batches) == (3, 2)


async def test_a_write_queued_past_its_deadline_fails_and_writes_nothing() -> None:
    """Real time, not autojump_clock: the batch in flight is in a real
    thread, which an autojumping clock would not wait for."""
    valve = Valve()
    commits = committer(valve, timeout_s=0.3)
    outcomes: dict[Any, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await submit_all(nursery, commits, [(echo, "stuck")], outcomes)
            await valve.wait_entered()
            started = trio.current_time()
            with pytest.raises(StoreError, match="busy"):
                await commits.submit(echo, "late")
            assert 0.3 <= trio.current_time() - started < 0.3 + 5
            valve.release()
        assert valve.batches == [["stuck"]] and outcomes == {"stuck": "stuck"}
        # and the queue goes on: the next write leads a batch of its own
        valve.release()
        assert await commits.submit(echo, "after") == "after"


# -- the real stores ---------------------------------------------------------------


async def test_many_concurrent_runs_take_fewer_batches_than_writes(backend: Backend) -> None:
    user = uid("user")
    async with opened(backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT * 2):
            before = store.stats()

            async def run(i: int) -> None:
                s = start_of(user, client_id=f"c{i}")
                thread = (await store.begin_run(s)).thread.id
                await store.finish_run(outcome_of(s, thread))

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(run, i)
            after = store.stats()
            assert after.writes - before.writes == 400
            assert after.write_batches - before.write_batches <= 400 // 4
            threads = await store.list_threads(user, limit=1000)
            assert len(threads) == 200
            statuses = [(await store.get_thread(user, t.id))[2][0].status for t in threads]
            assert statuses == ["completed"] * 200


async def test_a_failing_write_is_undone_alone(backend: Backend) -> None:
    """In one transaction: a begin_run on someone else's thread, one whose
    message id collides after it created its thread, and a finish_run of an
    unknown run fail, each with its own error and nothing of theirs kept;
    the writes around them commit."""
    owner, intruder, clumsy, fine = uid("user"), uid("user"), uid("user"), uid("user")
    async with opened(backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            taken = start_of(owner)
            thread = (await store.begin_run(taken)).thread.id
            writes: list[tuple[str, Callable[[], Any]]] = [
                ("ok-1", lambda: store.begin_run(start_of(fine, client_id="a"))),
                ("foreign", lambda: store.begin_run(start_of(intruder, thread_id=thread))),
                ("collision", lambda: store.begin_run(
                    attrs.evolve(start_of(clumsy), user_message_id=taken.user_message_id))),
                ("unknown-run", lambda: store.finish_run(outcome_of(start_of(fine), thread))),
                ("ok-2", lambda: store.begin_run(start_of(fine, client_id="b"))),
            ]
            results: dict[str, Any] = {}
            before = store.stats().write_batches

            async def write(name: str, call: Callable[[], Any]) -> None:
                try:
                    results[name] = await call()
                except Exception as exc:  # noqa: BLE001
                    results[name] = exc

            async with trio.open_nursery() as nursery:
                for name, call in writes:
                    nursery.start_soon(write, name, call)
            assert store.stats().write_batches - before == 1  # all in one batch
            assert isinstance(results["foreign"], NotFound)
            assert isinstance(results["unknown-run"], NotFound)
            assert isinstance(results["collision"], StoreError)
            assert not isinstance(results["collision"].__cause__, StoreError)  # translated once
            assert results["ok-1"].duplicate_of is None and results["ok-2"].duplicate_of is None
            assert len(await store.list_threads(fine)) == 2
            assert await store.list_threads(clumsy) == []  # its thread was rolled back with it
            assert len((await store.get_thread(owner, thread))[2]) == 1


@asynccontextmanager
async def writes_held(backend: Backend) -> AsyncIterator[None]:
    """Another connection holds what begin_run needs to write a new thread,
    so a batch in flight waits in its thread until the block ends."""
    if backend.pg is None:
        other = sqlite3.connect(backend.url.removeprefix("sqlite:///"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
    else:
        other = await trio.to_thread.run_sync(lambda: psycopg.connect(backend.pg.url, connect_timeout=5))
        try:
            await trio.to_thread.run_sync(other.execute, "LOCK TABLE threads IN EXCLUSIVE MODE")
            yield
        finally:
            await trio.to_thread.run_sync(other.close)  # ends its transaction: the lock goes


async def test_a_real_caller_cancelled_while_queued_leaves_nothing(backend: Backend) -> None:
    first_user, doomed_user = uid("user"), uid("user")
    async with opened(backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            results: list[Any] = []
            async with trio.open_nursery() as nursery, writes_held(backend):
                nursery.start_soon(_begin, store, first_user, results)
                await _until(lambda: store.stats().in_use == 1)  # its batch is in its thread
                with trio.CancelScope() as scope:
                    scope.deadline = trio.current_time() + 0.2
                    await store.begin_run(start_of(doomed_user))
                assert scope.cancelled_caught
                assert results == []  # the first is still held
            assert len(results) == 1 and results[0].duplicate_of is None
            await store.begin_run(start_of(first_user))  # writes go on
            assert len(await store.list_threads(first_user)) == 2
            assert await store.list_threads(doomed_user) == []


async def _begin(store: Store, user: str, results: list[Any]) -> None:
    results.append(await store.begin_run(start_of(user)))


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.005)
