"""This process's membership of a cluster (``NETRA_REDIS_URL``).

Every process of every machine that names the same Redis (and the same
PostgreSQL store) is one netra as its users see it. What they share through
Redis, and how:

- **Capacity**, as leases (:mod:`.leases`) that expire by themselves when
  their node dies: runs per user, connections per user, the global run
  capacity, model calls, calls of each tool with a concurrency, and one
  place per thread (a thread's runs take turns across nodes as they do on
  one). A node's own ``trio.CapacityLimiter`` stays in front of each shared
  one, so the common case of a free local place costs nothing extra there.
- **Where each run is**: a hash per user, run id -> node and thread, so a
  ``cancel`` (or an interrupting message) on any node reaches the node that
  owns the run, through that node's control channel.
- **Who is alive**, and their counts: each node refreshes a key of its own
  (expiring after one lease TTL) holding its connections and runs, which
  ``/metrics`` of every node adds up into the cluster's.
- **Runs of dead nodes**: every node looks for them in the store once per
  lease TTL (liveness there is the database's own lock, see
  :mod:`netra.store._nodes`) and records them failed, cause ``node_lost``.

What is not shared is documented in docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import attrs
import coredis
import trio

from .. import _json
from ..errors import NetraError, NotFound, StoreError
from ..runs import Ids
from ._redis import as_text, redis_client
from .leases import Lease, LeaseKeeper, SharedCapacityLimiter
from .link import LinkReader, link_keys

log = logging.getLogger("netra.cluster")

#: A run's entry in its user's hash outlives a node that never removed it
#: (it died) by this much at most; routing skips entries of dead nodes anyway.
_RUN_ENTRY_TTL_S = 24 * 3600
#: A run's entry, and its user's hash kept for the entry TTL, in one round trip.
_REGISTER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
#: A node silent this long leaves the index of nodes (its key expired long before).
_FORGET_NODES_MS = 3600 * 1000
#: Which failures of a Redis call are Redis's (short of a bug in netra).
_FAILURES = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.TooSlowError, StoreError, anyio.ClosedResourceError)


@attrs.frozen
class NodeCounts:
    """What one node reports of itself, and the cluster's sums of them."""

    nodes: int = 0
    connections: int = 0
    runs_active: int = 0
    runs_queued: int = 0


@attrs.define(eq=False)
class ClusterLimiter:
    """A local ``trio.CapacityLimiter`` in front of a shared one, with the
    part of trio's interface the agent loop uses (``acquire``, ``release``,
    ``acquire_nowait``, ``borrowed_tokens``, ``async with``). A place is
    held by the task that acquired it, as with trio's."""

    local: trio.CapacityLimiter
    shared: SharedCapacityLimiter
    _leases: dict[Any, Lease] = attrs.field(factory=dict, init=False)

    @property
    def borrowed_tokens(self) -> int:
        return self.local.borrowed_tokens

    @property
    def available_tokens(self) -> float:
        return self.local.available_tokens

    def statistics(self) -> Any:
        return self.local.statistics()

    def acquire_nowait(self) -> None:
        # The shared place is Redis's answer, which cannot be had without
        # waiting: callers fall back to acquire().
        raise trio.WouldBlock

    async def acquire(self) -> None:
        await self.local.acquire()
        try:
            lease = await self.shared.acquire()
        except BaseException:
            self.local.release()
            raise
        self._leases[trio.lowlevel.current_task()] = lease

    def release(self) -> None:
        lease = self._leases.pop(trio.lowlevel.current_task(), None)
        if lease is not None:
            self.shared.release(lease)
        self.local.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@attrs.define(eq=False)
class ClusterNode:
    """One node's side of the cluster: its lease keeper, its control
    channel, its heartbeat and the sweep for runs of dead nodes. Run with
    ``await nursery.start(node.run)``; nothing here works before that."""

    redis: coredis.Redis[Any]
    keeper: LeaseKeeper
    node_id: str
    prefix: str = "netra:"
    #: Applies a control message sent to this node (set by the hub).
    on_control: Callable[[dict[str, Any]], None] = lambda message: None
    #: This node's own counts, read at each heartbeat (set by the hub).
    counts: Callable[[], NodeCounts] = NodeCounts
    #: Records runs of dead nodes as node_lost (the store's; set by the hub).
    sweep: Callable[[], Awaitable[int]] | None = None
    #: Resumes a session of this node over a link, from a resume request
    #: another node sent (set by the hub; raises NotFound to refuse).
    on_resume: Callable[[dict[str, Any]], None] | None = None
    #: The prefix of the ids this node makes (sessions: a resume elsewhere finds the node by it).
    ids_prefix: str = ""
    #: The cluster's counts as of the last heartbeat (for /metrics).
    cluster: NodeCounts = attrs.field(factory=NodeCounts, init=False)
    _limiters: dict[str, SharedCapacityLimiter] = attrs.field(factory=dict, init=False)
    _forget: list[tuple[str, str]] = attrs.field(factory=list, init=False)
    _forget_wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _register_script: Any = attrs.field(init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    #: Reads every link stream a side on this node reads, in one blocking read.
    links: LinkReader = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._register_script = self.redis.register_script(_REGISTER)
        self.links = LinkReader(self)

    @classmethod
    def from_url(cls, url: str, *, node_id: str, ttl: float, prefix: str = "netra:") -> ClusterNode:
        redis = redis_client(url, client_name=f"netra:{node_id}")  # CLIENT LIST tells the nodes apart
        keeper = LeaseKeeper(redis, ttl=ttl, prefix=prefix, node_id=node_id)
        return cls(redis=redis, keeper=keeper, node_id=node_id, prefix=prefix)

    @property
    def ttl(self) -> float:
        return self.keeper.ttl

    # -- capacity -----------------------------------------------------------------

    def limiter(self, name: str, total_tokens: int) -> SharedCapacityLimiter:
        """The shared limiter ``name`` (kept while it has holders or waiters;
        per-user and per-thread ones come and go)."""
        limiter = self._limiters.get(name)
        if limiter is None or limiter.total_tokens != total_tokens:
            limiter = self.keeper.limiter(name, total_tokens)
            if not name.startswith(("user-", "thread:")):
                self._limiters[name] = limiter
        return limiter

    def layered(self, local: trio.CapacityLimiter, name: str) -> ClusterLimiter:
        """``local`` in front of the shared limiter ``name`` of the same size."""
        return ClusterLimiter(local, self.limiter(name, int(local.total_tokens)))

    async def take(
        self, limiters: list[SharedCapacityLimiter], on_wait: Callable[[SharedCapacityLimiter], None]
    ) -> list[tuple[SharedCapacityLimiter, Lease]]:
        """A place in each of ``limiters``, in order, calling ``on_wait``
        before waiting for one. Cancelled or failed, it holds nothing."""
        held: list[tuple[SharedCapacityLimiter, Lease]] = []
        try:
            for limiter in limiters:
                try:
                    lease = await limiter.acquire_nowait()
                except trio.WouldBlock:
                    on_wait(limiter)
                    lease = await limiter.acquire()
                held.append((limiter, lease))
        except BaseException:
            self.give_back(held)
            raise
        return held

    @staticmethod
    def give_back(held: list[tuple[SharedCapacityLimiter, Lease]]) -> None:
        """Release what :meth:`take` returned (never waits)."""
        for limiter, lease in reversed(held):
            limiter.release(lease)
        held.clear()

    # -- where runs are -------------------------------------------------------------

    def _runs_key(self, user_id: str) -> str:
        return f"{self.prefix}user-runs:{user_id}"

    def _control_channel(self, node_id: str) -> str:
        return f"{self.prefix}control:{node_id}"

    def _node_key(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    async def register_run(self, user_id: str, run_id: str, thread_id: str) -> None:
        """Say that ``run_id`` of ``user_id`` runs here (until :meth:`forget_run`)."""
        key = self._runs_key(user_id)
        entry = _json.dumps_str({"node": self.node_id, "thread": thread_id})
        await self._call(lambda: self._register(key, run_id, entry))

    async def _register(self, key: str, run_id: str, entry: str) -> None:
        await self._register_script(keys=[key], args=[run_id, entry, _RUN_ENTRY_TTL_S])

    def forget_run(self, user_id: str, run_id: str) -> None:
        """The run ended: its entry goes (sent by a task of the node: never waits)."""
        self._forget.append((user_id, run_id))
        self._forget_wakeup.set()

    async def runs_of(self, user_id: str) -> dict[str, tuple[str, str]]:
        """The user's runs in the cluster: run id -> (node, thread), live nodes only."""
        raw = await self._call(lambda: self.redis.hgetall(self._runs_key(user_id)))
        entries = {as_text(k): _json.loads(v) for k, v in raw.items()}
        nodes = sorted({e["node"] for e in entries.values()})
        if not nodes:
            return {}
        alive = await self._call(lambda: self.redis.mget([self._node_key(n) for n in nodes]))
        live = {n for n, value in zip(nodes, alive, strict=True) if value is not None}
        return {run_id: (e["node"], e["thread"]) for run_id, e in entries.items() if e["node"] in live}

    async def route_cancel(
        self, user_id: str, *, run_id: str | None, thread_id: str | None, reason: str, by: str,
        keep: str | None = None,
    ) -> int:
        """Send a cancel of the user's run ``run_id`` (or of every run of
        ``thread_id`` but ``keep``) to the nodes that own them; how many
        runs it was sent for. This node's own runs are the caller's."""
        targets: dict[str, list[str]] = {}
        for rid, (node, thread) in (await self.runs_of(user_id)).items():
            if node == self.node_id or rid == keep:
                continue
            if rid == run_id or (run_id is None and thread == thread_id):
                targets.setdefault(node, []).append(rid)
        for node, run_ids in targets.items():
            message = _json.dumps_str({
                "op": "cancel", "user_id": user_id, "run_ids": run_ids, "reason": reason, "by": by,
            })
            await self._call(lambda n=node, m=message: self.redis.publish(self._control_channel(n), m))
        return sum(len(v) for v in targets.values())

    async def send_control(self, node_id: str, message: dict[str, Any]) -> None:
        """Send a control message to one node (its hub's ``apply_control``
        gets it): e.g. a decision on an approval its run waits for."""
        data = _json.dumps_str(message)
        await self._call(lambda: self.redis.publish(self._control_channel(node_id), data))

    # -- running --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join: lease keeper, control channel, heartbeat, sweep, until cancelled.

        The Redis client outlives the work on it: a cancel from outside
        first stops the work (the keeper gives back what it can), then the
        client closes. Cancelled at once together, coredis's pub/sub would
        unsubscribe on a connection already closed."""
        work = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_shielded, work)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                work.cancel()

    async def _run_shielded(self, work: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope(shield=True):
            async with self.redis:
                with work:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await nursery.start(self.keeper.run)
                        await nursery.start(self._listen)
                        await self._heartbeat_once()
                        nursery.start_soon(self._heartbeat_forever)
                        nursery.start_soon(self._forget_forever)
                        nursery.start_soon(self.links.run)
                        if self.sweep is not None:
                            nursery.start_soon(self._sweep_forever)
                        log.info("joined the cluster as %s", self.node_id)
                        task_status.started()

    async def _listen(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply the control messages sent to this node; subscribed again
        after a failure (a cancel sent meanwhile is lost, and its sender's
        client may send it again)."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await self._call(lambda: pubsub.subscribe(self._control_channel(self.node_id)))
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    async for message in pubsub:
                        if message["type"] == "message":
                            self._apply(message["data"])
            except* _FAILURES as group:
                if task_status is not trio.TASK_STATUS_IGNORED:
                    raise  # never subscribed: the node cannot join
                log.warning("the cluster's control channel failed, subscribing again: %r", group.exceptions[0])
            await trio.sleep(1.0)

    def _apply(self, data: bytes | str) -> None:
        try:
            decoded = _json.loads(data)
        except ValueError:
            log.warning("a control message that is not JSON was ignored")
            return
        if not isinstance(decoded, dict):
            return
        if decoded.get("op") == "resume":
            if self._nursery is not None:
                self._nursery.start_soon(self._answer_resume, decoded)
            return
        self.on_control(decoded)

    async def _answer_resume(self, request: dict[str, Any]) -> None:
        """Another node's client resumes a session of this node: carry it
        over the link named in the request, or say no on it."""
        try:
            if self.on_resume is None:
                raise NotFound("no sessions here")
            self.on_resume(request)  # the link's transport answers "ok" itself
        except (NetraError, KeyError, TypeError, ValueError) as exc:
            out_key, _ = link_keys(self, str(request.get("link")))
            why = exc.message if isinstance(exc, NetraError) else "a malformed request"
            try:
                await self._call(lambda: self.redis.xadd(out_key, {"refused": why}))
                await self._call(lambda: self.redis.expire(out_key, 60))
            except StoreError as failure:
                log.warning("could not refuse a resume: %r", failure)

    async def owner_of(self, made: str) -> str | None:
        """The live node that made the id ``made`` (a session id), if any."""
        prefix = Ids.prefix_of(made)
        if not prefix:
            return None
        owner = await self._call(lambda: self.redis.get(f"{self.prefix}ids:{prefix}"))
        return as_text(owner) if owner is not None else None

    async def _heartbeat_once(self) -> None:
        """Refresh this node's key with its counts, and add up everyone's."""
        value = _json.dumps_str(attrs.asdict(self.counts()))
        ttl_ms = max(1, int(self.ttl * 1000))
        now_ms = int(time.time() * 1000)
        nodes_key = f"{self.prefix}nodes"
        await self._call(lambda: self.redis.set(self._node_key(self.node_id), value, px=ttl_ms))
        if self.ids_prefix:
            await self._call(lambda: self.redis.set(f"{self.prefix}ids:{self.ids_prefix}", self.node_id, px=ttl_ms))
        # the index of nodes; a node is alive while its own key is there
        await self._call(lambda: self.redis.zadd(nodes_key, {self.node_id: now_ms}))
        await self._call(lambda: self.redis.zremrangebyscore(nodes_key, "-inf", now_ms - _FORGET_NODES_MS))
        nodes = [as_text(n) for n in await self._call(lambda: self.redis.zrange(nodes_key, 0, -1))]
        values = await self._call(lambda: self.redis.mget([self._node_key(n) for n in nodes])) if nodes else []
        total = NodeCounts()
        for raw in values:
            if raw is None:
                continue
            counts = _json.loads(raw)
            total = NodeCounts(
                nodes=total.nodes + 1,
                connections=total.connections + counts.get("connections", 0),
                runs_active=total.runs_active + counts.get("runs_active", 0),
                runs_queued=total.runs_queued + counts.get("runs_queued", 0),
            )
        self.cluster = total

    async def _heartbeat_forever(self) -> None:
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                await self._heartbeat_once()
            except _FAILURES as exc:
                log.warning("cluster heartbeat failed: %r", exc)

    async def _forget_forever(self) -> None:
        while True:
            await self._forget_wakeup.wait()
            self._forget_wakeup = trio.Event()
            batch, self._forget = self._forget, []
            by_user: dict[str, list[str]] = {}
            for user_id, run_id in batch:
                by_user.setdefault(user_id, []).append(run_id)
            for user_id, run_ids in by_user.items():
                try:
                    await self._call(lambda u=user_id, r=run_ids: self.redis.hdel(self._runs_key(u), r))
                except _FAILURES as exc:  # a stale entry: routing skips it once this node is gone
                    log.warning("could not remove ended runs from the cluster: %r", exc)

    async def _sweep_forever(self) -> None:
        assert self.sweep is not None
        while True:
            await trio.sleep(self.ttl)
            try:
                closed = await self.sweep()
            except Exception as exc:  # the store's failure: next time
                log.warning("the sweep for runs of dead nodes failed: %r", exc)
                continue
            if closed:
                log.warning("closed %d runs of a node that is gone (node_lost)", closed)

    async def _call(self, send: Callable[[], Awaitable[Any]]) -> Any:
        """A Redis call bounded by the keeper's timeout and shielded from
        cancellation (why: see ``_redis.py``); failures as StoreError."""
        return await self.keeper._scripts.call(send, self.keeper.timeout)
