"""Group commit: the writes of many runs in one transaction and one thread hop.

Every run writes twice (``begin_run``, ``finish_run``), and with many runs at
once each write paid a worker-thread hop and a transaction of its own, one
after the other behind SQLite's single write lock. Here, a write that
arrives while another batch is being written waits in a queue; when that
batch is done, the first waiting write leads the next one: it takes its turn
on a connection, takes every write queued by then (at most ``max_batch``),
and writes them all in one transaction in one thread hop. One batch is in
flight at a time, so batches never wait on each other's locks.

Each caller still gets its own result or its own exception. A batch is first
written plainly (:func:`write_all`); if one of its writes fails (a NotFound
for someone else's thread, a value the database refuses), that transaction
is rolled back and the batch is written again with a savepoint around each
write (:func:`write_each`), so the failing one is undone alone and the
others commit. Failures are rare, so the common batch pays no savepoints
(on PostgreSQL each is a round trip). A failure of the transaction itself
(BEGIN, COMMIT, a lost connection) fails every write of the batch.

Waiting is bounded like any store call: a write still queued at its deadline
(``timeout_s`` after it arrived) fails with StoreError and nothing is
written. A caller cancelled while its write is queued leaves nothing behind.
Once taken into a batch, a write is seen through, like a thread that cannot
be abandoned: its caller gets its result, and the cancellation lands at its
next checkpoint. That matters: a ``begin_run`` that was written must be
known to its run, or nobody would ever finish it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import trio

from ..errors import NetraError, StoreError
from ._gate import Gate

#: A write: ``op(db, *args)`` in the batch's transaction.
Call = tuple[Callable[..., Any], tuple[Any, ...]]
#: What a write came to: (value, None) or (None, exception).
Result = tuple[Any, BaseException | None]

_SAVEPOINT = "netra_write"


@attrs.define(eq=False)
class _Write:
    call: Call
    deadline: float
    #: queued -> taken (in someone's batch) -> done
    #: queued -> leading (promoted, or first) -> done
    #: queued | leading -> dropped (its caller left before it was taken)
    state: Literal["queued", "leading", "taken", "done", "dropped"] = "queued"
    value: Any = None
    error: BaseException | None = None
    wake: trio.Event = attrs.field(factory=trio.Event)

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@attrs.define(eq=False)
class GroupCommit:
    """Batches writes for one store; ``work`` writes a batch in a worker
    thread (one connection, one transaction) and returns one
    :data:`Result` per call, or raises when the whole batch failed."""

    gate: Gate
    work: Callable[[list[Call]], list[Result]]
    max_batch: int = 64
    _queue: deque[_Write] = attrs.field(factory=deque, init=False)
    _leading: bool = attrs.field(default=False, init=False)
    #: Writes done, and the batches (thread hops) they took.
    writes: int = attrs.field(default=0, init=False)
    batches: int = attrs.field(default=0, init=False)

    async def submit(self, op: Callable[..., Any], *args: Any) -> Any:
        """``op(db, *args)`` in some batch's transaction; its own result."""
        write = _Write((op, args), trio.current_time() + self.gate.timeout_s)
        if self._leading:
            self._queue.append(write)
            await self._wait(write)
            if write.state == "done":
                return write.result()
        else:
            self._leading = True
            write.state = "leading"
        return await self._lead(write)

    async def _wait(self, write: _Write) -> None:
        """Until ``write`` is done, or it is its turn to lead."""
        interrupted: BaseException | None = None
        try:
            with trio.move_on_at(write.deadline):
                await write.wake.wait()
        except BaseException as exc:  # noqa: BLE001  (re-raised below unless the write was taken)
            interrupted = exc
        match write.state:
            case "queued":
                write.state = "dropped"  # skipped when the queue is taken
                if interrupted is not None:
                    raise interrupted
                raise StoreError("the database is busy")
            case "leading" if interrupted is not None:
                write.state = "dropped"
                self._promote_next()
                raise interrupted
            case "taken":
                with trio.CancelScope(shield=True):
                    await write.wake.wait()
        if interrupted is not None and not isinstance(interrupted, trio.Cancelled):
            raise interrupted
        # A Cancelled that came too late to stop the write is not re-raised:
        # the caller gets its result, and its cancelled scope raises again at
        # its next checkpoint.

    async def _lead(self, leader: _Write) -> Any:
        batch = [leader]
        results: list[Result] | None = None
        try:
            async with self.gate.turn(leader.deadline):
                # what queued up while the previous batch was written, and
                # while this one waited for its turn
                while len(batch) < self.max_batch and self._queue:
                    write = self._queue.popleft()
                    if write.state == "queued":
                        write.state = "taken"
                        batch.append(write)
                try:
                    results = await self.gate.hop(self.work, [w.call for w in batch])
                except Exception as exc:  # noqa: BLE001  (the whole transaction failed: each caller is told)
                    results = [(None, exc if i == 0 else _copy(exc)) for i in range(len(batch))]
                self.batches += 1
                self.writes += len(batch)
        finally:
            if results is None:  # no turn (busy, cancelled), or the hop itself died
                results = [(None, StoreError("the write was not made")) for _ in batch]
            for write, (value, error) in zip(batch, results, strict=True):
                write.value, write.error, write.state = value, error, "done"
                write.wake.set()
            self._promote_next()
        return leader.result()

    def _promote_next(self) -> None:
        while self._queue:
            write = self._queue.popleft()
            if write.state == "queued":
                write.state = "leading"
                write.wake.set()
                return
        self._leading = False


def _copy(exc: Exception) -> Exception:
    """The same failure for another caller: one exception object raised in
    several tasks would collect all their tracebacks."""
    if isinstance(exc, NetraError):
        twin = type(exc)(exc.message, **exc.extra)
        twin.__cause__ = exc.__cause__
        return twin
    return exc


class WriteFailed(NetraError):
    """One write of a plainly written batch failed: roll back, and write the
    batch again write by write (:func:`write_each`). A NetraError so that the
    connection, rolled back cleanly, is kept."""


def write_all(db: Any, calls: Sequence[Call]) -> list[Result]:
    """Run ``calls`` in the caller's transaction, no savepoints. A batch of
    one fails as its transaction does; in a larger batch, the first write
    that fails raises :class:`WriteFailed` (its transaction is then rolled
    back by the caller, who goes on with :func:`write_each`)."""
    if len(calls) == 1:
        op, args = calls[0]
        return [(op(db, *args), None)]
    results: list[Result] = []
    for op, args in calls:
        try:
            results.append((op(db, *args), None))
        except Exception as exc:
            raise WriteFailed("a write of the batch failed") from exc
    return results


def write_each(
    db: Any,
    calls: Sequence[Call],
    driver_errors: tuple[type[Exception], ...],
    translate: Callable[[Exception], StoreError],
) -> list[Result]:
    """Run ``calls`` in the caller's transaction, each under a savepoint of
    its own: a call that fails is rolled back alone and gets its exception
    (driver exceptions translated), the others stand. If even the rollback
    to the savepoint fails, the transaction is lost: the original exception
    propagates and the whole batch fails with it."""
    results: list[Result] = []
    for op, args in calls:
        db.run(f"SAVEPOINT {_SAVEPOINT}")
        try:
            value = op(db, *args)
        except NetraError as exc:
            _undo(db, exc, driver_errors)
            results.append((None, exc))
        except driver_errors as exc:
            _undo(db, exc, driver_errors)
            error = translate(exc)
            error.__cause__ = exc
            results.append((None, error))
        else:
            results.append((value, None))
        db.run(f"RELEASE SAVEPOINT {_SAVEPOINT}")
    return results


def _undo(db: Any, exc: Exception, driver_errors: tuple[type[Exception], ...]) -> None:
    try:
        db.run(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
    except driver_errors:
        raise exc from None
