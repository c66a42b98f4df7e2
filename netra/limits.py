"""Capacity and rate limits.

Run capacity is three ``trio.CapacityLimiter`` layers acquired in order:
per connection, per user (shared by all of that user's connections), global.
A run beyond its user's cap waits in that user's limiter and never occupies a
place in the global queue, so one user flooding cannot starve the others.
Whether a run may wait at all is decided synchronously when its message
arrives (queue caps), so a refused run gets ``busy`` before any event of it.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

@attrs.define(eq=False)
class TokenBucket:
    """Message rate per connection: ``rate`` per second, bursts of ``burst``."""

    rate: float
    burst: int
    _tokens: float = attrs.field(init=False)
    _stamp: float = attrs.field(init=False)
    #: Refusals in a row: any accepted message resets it to 0.
    refusals: int = 0

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)
        self._stamp = trio.current_time()

    def take(self) -> bool:
        now = trio.current_time()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.refusals = 0
            return True
        self.refusals += 1
        return False

    def retry_after_ms(self) -> int:
        return max(1, round((1.0 - self._tokens) / self.rate * 1000)) if self.rate > 0 else 1000


@attrs.define(eq=False)
class ThreadState:
    """Runs of one thread: at most one executes; the others wait their turn."""

    lock: trio.Lock = attrs.field(factory=trio.Lock)
    active: Any = None  # the executing Run
    waiting: list[Any] = attrs.field(factory=list)  # Runs waiting for the thread

    @property
    def busy(self) -> bool:
        return self.active is not None or bool(self.waiting)


@attrs.define(eq=False)
class UserState:
    """What one user holds across all their connections. Dropped when idle."""

    user_id: str
    max_runs: int
    connections: set[Any] = attrs.field(factory=set)
    threads: dict[str, ThreadState] = attrs.field(factory=dict)
    runs: set[Any] = attrs.field(factory=set)  # every live Run of this user
    pending: int = 0  # runs accepted but waiting (thread or capacity)
    _run_limiter: trio.CapacityLimiter | None = None

    @property
    def run_limiter(self) -> trio.CapacityLimiter:
        """The per-user run limit, made on the first run (idle users hold none)."""
        if self._run_limiter is None:
            self._run_limiter = trio.CapacityLimiter(self.max_runs)
        return self._run_limiter

    @property
    def idle(self) -> bool:
        return not self.connections and not self.runs

    def thread(self, thread_id: str) -> ThreadState:
        state = self.threads.get(thread_id)
        if state is None:
            state = self.threads[thread_id] = ThreadState()
        return state

    def release_thread(self, thread_id: str) -> None:
        state = self.threads.get(thread_id)
        if state is not None and not state.busy and not state.lock.locked():
            del self.threads[thread_id]


async def acquire_all(
    owner: object, limiters: list[trio.CapacityLimiter], on_wait: Any
) -> list[trio.CapacityLimiter]:
    """Acquire ``limiters`` in order on behalf of ``owner`` and return them;
    before blocking on one, ``on_wait(limiter)`` (which announces the wait).
    If this is cancelled while waiting, what it acquired is released."""
    held: list[trio.CapacityLimiter] = []
    try:
        for limiter in limiters:
            try:
                limiter.acquire_on_behalf_of_nowait(owner)
            except trio.WouldBlock:
                on_wait(limiter)
                await limiter.acquire_on_behalf_of(owner)
            held.append(limiter)
    except BaseException:
        release_all(owner, held)
        raise
    return held


def release_all(owner: object, held: list[trio.CapacityLimiter]) -> None:
    for limiter in reversed(held):
        limiter.release_on_behalf_of(owner)
    held.clear()


def all_available(limiters: list[trio.CapacityLimiter]) -> bool:
    return all(limiter.available_tokens > 0 for limiter in limiters)
