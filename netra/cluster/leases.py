"""Capacity shared by every netra process, as leases on Redis.

A :class:`SharedCapacityLimiter` works like ``trio.CapacityLimiter`` across
processes and machines: a named resource ("runs", "model:openai",
"user-runs:alice") has ``total_tokens`` places, and each holder takes one.
What a process holds is a :class:`Lease` with a time to live. The
:class:`LeaseKeeper` of each process extends its leases while they are held
and removes them when they are released. A process that dies stops
extending, so its leases expire within the TTL and their places come back by
themselves: a dead node can hold capacity for at most one TTL, never leak it.

The scripts that take, extend and give back places, and the calls to Redis,
are in ``_lua.py`` and ``_redis.py``. Their clock is Redis's, never a node's.

Waiting is woken, not polled: a release publishes the resource's name, and
the keeper wakes one waiter per place given back. Because a message can be
missed (a reconnect, a node that died without releasing), every waiter also
retries by itself when the soonest lease of that resource would expire.
No order is kept between nodes: a waiter gets a place when it asks at the
right time, and a task that arrives while others wait may take it first.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import coredis
import trio

from ..errors import StoreError
from ._redis import LeaseScripts, as_text

log = logging.getLogger("netra.cluster")


def _default_node_id() -> str:
    # readable in ZRANGE output: which host and process holds a place
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@attrs.define(eq=False)
class Lease:
    """One place in one resource, held by this process until it is released
    or lost."""

    name: str
    token: str
    #: Set when the place was lost while held: the keeper could not extend it
    #: in time (Redis unreachable for a TTL, or this process stalled), and
    #: another node may have it now. A holder that must never exceed the
    #: capacity watches this and stops.
    lost: trio.Event = attrs.field(factory=trio.Event)
    #: trio time by which the lease surely expires unless extended again,
    #: counted from when the last extension was *sent* (so never too late).
    expires_at: float = math.inf


@attrs.frozen
class LimiterStatistics:
    name: str
    total_tokens: int
    #: Places held by this process.
    borrowed_tokens: int
    #: Places held by every process, as Redis counts them now.
    cluster_borrowed_tokens: int
    #: Tasks of this process waiting for a place.
    tasks_waiting: int


@attrs.define(eq=False)
class _WaitRoom:
    """The waiters of one resource on this process, while there are any."""

    lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    #: Tasks inside acquire() after a first refusal.
    waiting: int = 0
    #: Tasks inside acquire() at all: the room goes when the last one leaves.
    users: int = 0
    #: Release messages seen: a waiter compares it around its attempt, so a
    #: release that lands while it asks is never slept through.
    generation: int = 0


@attrs.define(eq=False)
class LeaseKeeper:
    """This process's side of the shared limits: it extends every lease the
    process holds (every ``ttl / 3``), gives back released ones, and wakes
    waiters when another process gives a place back.

    It runs in a nursery the caller owns: ``await nursery.start(keeper.run)``.
    Leases can only be taken while it runs, since a lease nobody extends
    would expire under its holder. When ``run`` ends, leases still held are
    marked lost and expire in Redis within the TTL.

    The Redis client is the caller's too (opened with ``async with``, and
    shared with whatever else talks to Redis); the keeper takes one of its
    connections for pub/sub while it runs. Make it with :func:`~netra.cluster.redis_client`,
    whose ``connect_timeout`` is below the keeper's ``timeout`` (why: see
    ``_redis.py``).
    """

    redis: coredis.Redis[Any]
    #: How long a lease outlives the last extension of it: the longest a dead
    #: process's places stay taken. Extensions are sent every ttl / 3, so a
    #: process survives one or two failed ones.
    ttl: float = attrs.field(default=10.0, kw_only=True)
    #: Namespace of the keys and channel, shared by every process of a cluster.
    prefix: str = attrs.field(default="netra:", kw_only=True)
    #: Names this process in Redis (each token starts with it).
    node_id: str = attrs.field(factory=_default_node_id, kw_only=True)
    #: Bound on each Redis call (a call that times out is a StoreError; one
    #: that was taking a place gives it back). Above the client's
    #: connect_timeout.
    timeout: float = attrs.field(default=5.0, kw_only=True)
    #: Leases lost while held, since start (a counter for metrics).
    leases_lost: int = attrs.field(default=0, init=False)

    _held: dict[str, dict[str, Lease]] = attrs.field(factory=dict, init=False)
    _rooms: dict[str, _WaitRoom] = attrs.field(factory=dict, init=False)
    _serial: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    _running: bool = attrs.field(default=False, init=False)
    #: Released tokens not yet sent to Redis, by resource: the releaser
    #: sends them all, or an acquire of the same resource takes them along.
    _released: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _releaser_wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _scripts: LeaseScripts = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not (self.ttl > 0 and math.isfinite(self.ttl)):
            raise ValueError(f"ttl must be a positive number of seconds, not {self.ttl!r}")
        self._scripts = LeaseScripts(self.redis)

    @property
    def channel(self) -> str:
        """Where releases are announced to every process."""
        return f"{self.prefix}lease-released"

    def key(self, name: str) -> str:
        return f"{self.prefix}lease:{name}"

    def limiter(self, name: str, total_tokens: int) -> SharedCapacityLimiter:
        """The limiter of resource ``name``. Every process must give the same
        name the same ``total_tokens``: each checks its own figure."""
        return SharedCapacityLimiter(self, name, total_tokens)

    @property
    def running(self) -> bool:
        return self._running

    def borrowed(self, name: str) -> int:
        """Places of ``name`` this process holds (no I/O: for metrics)."""
        return len(self._held.get(name, ()))

    def waiting(self, name: str) -> int:
        room = self._rooms.get(name)
        return room.waiting if room is not None else 0

    # -- running ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Extend, release and listen until cancelled. Started (for
        ``nursery.start``) once it is subscribed to releases, so no release
        announced after that is missed."""
        if self._running:
            raise RuntimeError("this LeaseKeeper is already running")
        # fail fast on a Redis that is not there: the pub/sub below would
        # keep retrying the connection with backoff, forever
        await self._scripts.ping(self.timeout)
        try:
            async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await self._scripts.call(lambda: pubsub.subscribe(self.channel), self.timeout)
                self._running = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen, pubsub)
                    nursery.start_soon(self._refresh_forever)
                    nursery.start_soon(self._release_forever)
                    task_status.started()
        finally:
            self._running = False
            await self._stop()

    async def _stop(self) -> None:
        """Give back what was released but not yet sent; what is still held
        will expire in Redis, and its holders are told now."""
        pending, self._released = self._released, {}
        await self._send_releases(pending)  # shielded, and bounded by the timeout
        for name, leases in list(self._held.items()):
            for lease in list(leases.values()):
                self._lose(lease, "the lease keeper stopped")
        for room in self._rooms.values():
            room.lot.unpark_all()  # they find the keeper stopped

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub:
            if message["type"] != "message":
                continue
            count, _, name = as_text(message["data"]).partition(" ")
            room = self._rooms.get(name)
            if room is not None and count.isdigit():
                room.generation += 1
                room.lot.unpark(count=int(count))

    async def _refresh_forever(self) -> None:
        while True:
            await trio.sleep(self.ttl / 3)
            await self.refresh()

    async def refresh(self) -> None:
        """Extend every lease this process holds, once; mark lost those
        Redis no longer has, or that may have expired while Redis could not
        be reached. Called every ttl / 3 by ``run``."""
        held = {name: list(leases.values()) for name, leases in self._held.items() if leases}
        if not held:
            return
        sent_at = trio.current_time()
        try:
            lost = await self._scripts.refresh(
                {self.key(name): [lease.token for lease in leases] for name, leases in held.items()},
                self._ttl_ms, min(self.timeout, self.ttl / 3),
            )
        except StoreError as exc:
            log.warning("could not extend %d leases: %s", sum(map(len, held.values())), exc)
            for leases in held.values():
                for lease in leases:
                    if lease.expires_at <= trio.current_time():
                        self._lose(lease, "it could not be extended in time")
            return
        for leases in held.values():
            for lease in leases:
                if lease.token in lost:
                    self._lose(lease, "Redis no longer had it")
                else:
                    lease.expires_at = sent_at + self.ttl

    def _lose(self, lease: Lease, why: str) -> None:
        leases = self._held.get(lease.name, {})
        if leases.pop(lease.token, None) is None:
            return  # released meanwhile: not lost
        if not leases:
            del self._held[lease.name]
        self.leases_lost += 1
        lease.lost.set()
        log.warning("lost a lease on %s: %s", lease.name, why)

    async def _release_forever(self) -> None:
        while True:
            await self._releaser_wakeup.wait()
            self._releaser_wakeup = trio.Event()
            batch, self._released = self._released, {}
            await self._send_releases(batch)

    async def _send_releases(self, batch: dict[str, list[str]]) -> None:
        """Remove ``batch``'s tokens (by resource) in one script call. If
        Redis does not take it, the tokens are no longer extended and expire
        within the TTL."""
        if not batch:
            return
        try:
            await self._scripts.release(
                self.channel, {(self.key(name), name): tokens for name, tokens in batch.items()}, self.timeout
            )
        except StoreError as exc:
            count = sum(map(len, batch.values()))
            log.warning("could not release %d leases (they expire within the TTL): %s", count, exc)

    @property
    def _ttl_ms(self) -> int:
        return round(self.ttl * 1000)

    # -- for the limiters ---------------------------------------------------------

    def _new_token(self) -> str:
        return f"{self.node_id}:{next(self._serial)}"

    def _give_back(self, name: str, *tokens: str) -> None:
        if self._running:
            self._released.setdefault(name, []).extend(tokens)
            self._releaser_wakeup.set()
        # else: nobody extends them any more, and they expire within the TTL

    def _hold(self, name: str, token: str, sent_at: float) -> Lease:
        lease = Lease(name=name, token=token, expires_at=sent_at + self.ttl)
        self._held.setdefault(name, {})[token] = lease
        return lease

    def _release_lease(self, lease: Lease) -> None:
        leases = self._held.get(lease.name)
        if leases is None or leases.pop(lease.token, None) is None:
            return  # released twice, or lost: nothing of it is held
        if not leases:
            del self._held[lease.name]
        self._give_back(lease.name, lease.token)

    def _room(self, name: str) -> _WaitRoom:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _WaitRoom()
        room.users += 1
        return room

    def _leave(self, name: str, room: _WaitRoom) -> None:
        room.users -= 1
        if room.users == 0:
            del self._rooms[name]


@attrs.frozen
class SharedCapacityLimiter:
    """``trio.CapacityLimiter`` for a resource that every process shares.

    A place is a :class:`Lease`, returned by :meth:`acquire` and given back
    with :meth:`release` (or both at once with ``async with
    limiter.hold()``). :meth:`release` does not wait: the keeper sends it to
    Redis, so it can be called where trio's can, in a ``finally`` of a
    cancelled task. Every method that talks to Redis raises
    :class:`~netra.errors.StoreError` when Redis fails or does not answer
    within the keeper's timeout; a place that such a call may have taken
    is given back.
    """

    keeper: LeaseKeeper
    name: str
    total_tokens: int

    def __attrs_post_init__(self) -> None:
        if self.total_tokens < 1:
            raise ValueError(f"total_tokens of {self.name!r} must be at least 1, not {self.total_tokens}")

    @property
    def borrowed_tokens(self) -> int:
        """Places this process holds (no I/O: for metrics)."""
        return self.keeper.borrowed(self.name)

    @property
    def tasks_waiting(self) -> int:
        """Tasks of this process waiting in :meth:`acquire` (no I/O)."""
        return self.keeper.waiting(self.name)

    async def acquire_nowait(self) -> Lease:
        """A place if one is free now, else ``trio.WouldBlock``. Async all
        the same, since the answer is Redis's; not a cancellation point (its
        call is shielded, see ``_redis.py``)."""
        lease, _ = await self._try()
        if lease is None:
            raise trio.WouldBlock
        return lease

    async def acquire(self) -> Lease:
        """A place, waiting as long as the caller's cancel scopes allow.
        Cancelled, it holds nothing; cancelled while Redis was giving it a
        place, it returns the lease, and the caller's next checkpoint raises
        (so take it with ``hold()``, or release in a ``finally``)."""
        room = self.keeper._room(self.name)
        woken = refused = False
        try:
            while True:
                seen = room.generation
                try:
                    # _try's Redis call is shielded: take cancellation here
                    await trio.lowlevel.checkpoint_if_cancelled()
                    lease, retry_in = await self._try()
                except BaseException:
                    if woken:  # hand the wake-up on to a waiter that will use it
                        room.lot.unpark()
                    raise
                woken = False
                if lease is not None:
                    return lease
                if not refused:
                    refused = True
                    room.waiting += 1
                if room.generation != seen:
                    continue  # a place was given back while we asked
                # jitter: waiters of many processes should not all ask at once
                wait = min(max(retry_in, 0.01), self.keeper.ttl) * random.uniform(1.0, 1.1)
                with trio.move_on_after(wait) as polled:
                    await room.lot.park()
                woken = not polled.cancelled_caught
        finally:
            if refused:
                room.waiting -= 1
            self.keeper._leave(self.name, room)

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[Lease]:
        """``async with limiter.hold() as lease:`` holds a place for the block."""
        lease = await self.acquire()
        try:
            yield lease
        finally:
            self.release(lease)

    def release(self, lease: Lease) -> None:
        """Give ``lease``'s place back. Never waits and never fails: if Redis
        cannot be told, the place is no longer extended and comes back within
        the TTL. Releasing a lost or already released lease does nothing."""
        if lease.name != self.name:
            raise ValueError(f"a lease on {lease.name!r} released through the limiter of {self.name!r}")
        self.keeper._release_lease(lease)

    async def statistics(self) -> LimiterStatistics:
        keeper = self.keeper
        return LimiterStatistics(
            name=self.name,
            total_tokens=self.total_tokens,
            borrowed_tokens=self.borrowed_tokens,
            cluster_borrowed_tokens=await keeper._scripts.count(keeper.key(self.name), keeper.timeout),
            tasks_waiting=self.tasks_waiting,
        )

    async def _try(self) -> tuple[Lease | None, float]:
        """One attempt: the lease, or None and how long until the soonest
        lease of this resource would expire."""
        keeper = self.keeper
        if not keeper.running:
            raise RuntimeError("leases are taken while the LeaseKeeper runs (nursery.start(keeper.run))")
        token = keeper._new_token()
        released = keeper._released.pop(self.name, [])
        sent_at = trio.current_time()
        try:
            taken, retry_in = await keeper._scripts.acquire(
                keeper.key(self.name), token, self.total_tokens, keeper._ttl_ms, keeper.timeout,
                channel=keeper.channel, name=self.name, released=released,
            )
        except StoreError:
            # the script may have run even so, its answer late or lost
            keeper._give_back(self.name, *released, token)
            raise
        if taken:
            return keeper._hold(self.name, token, sent_at), 0.0
        return None, retry_in
