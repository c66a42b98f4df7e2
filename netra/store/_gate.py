"""Worker-thread access to a fixed number of database connections.

Both SQL backends use synchronous drivers from worker threads. A
:class:`Gate` admits at most ``size`` operations at once (one per
connection), bounds the wait for a turn by ``timeout_s``, runs the operation
in a thread of its own limiter (so store threads never compete with other
``to_thread`` users), and keeps the counts
:class:`~netra.store.base.PoolStats` reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from ..errors import StoreError
from .base import PoolStats

T = TypeVar("T")


@attrs.define(eq=False)
class Gate:
    size: int
    timeout_s: float
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    # to_thread's own limiter: never contended (the one above is taken first),
    # it only keeps our threads out of trio's default, shared limiter.
    _threads: trio.CapacityLimiter = attrs.field(init=False)
    in_use: int = 0
    waiting: int = 0
    waits_total: int = 0

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.size)
        self._threads = trio.CapacityLimiter(self.size)

    @asynccontextmanager
    async def turn(self, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one connection's turn. Waiting for it ends at ``deadline``
        (default: ``timeout_s`` from now) with StoreError; the wait is
        cancellable, the turn itself is released however the block ends."""
        limiter = self._limiter
        if limiter.available_tokens == 0 or limiter.statistics().tasks_waiting:
            self.waits_total += 1
        if deadline is None:
            deadline = trio.current_time() + self.timeout_s
        self.waiting += 1
        try:
            with trio.move_on_at(deadline) as waited:
                await limiter.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:
            raise StoreError("the database is busy")
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            limiter.release()

    async def hop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, inside a :meth:`turn`. The thread
        is never abandoned: it holds a connection until it returns, so a
        cancellation waits for it and lands at the caller's next checkpoint."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._threads)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread once a connection is free."""
        async with self.turn():
            return await self.hop(fn, *args)

    def stats(self) -> PoolStats:
        return PoolStats(size=self.size, in_use=self.in_use, waiting=self.waiting, waits_total=self.waits_total)
