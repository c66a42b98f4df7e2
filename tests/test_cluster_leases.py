"""Shared capacity leases (netra.cluster) against a real Redis.

Two "nodes" here are two LeaseKeepers on two Redis clients of their own, as
two netra processes would be; one test kills a real process. Redis expires
leases by its own clock, in real time, so these tests run in real time (no
autojump_clock) with short TTLs, and every one under an absolute
``trio.fail_after``. The Redis server and the per-test key prefix come from
test_redis_trio.py (skipped, with the reason, when no Redis answers).
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

import netra.cluster
from netra.cluster import LeaseKeeper, SharedCapacityLimiter, leases, redis_client
from netra.errors import StoreError

from .test_redis_trio import prefix as prefix, redis_url as redis_url  # fixtures

TEST_TIMEOUT = 20.0


@asynccontextmanager
async def node(url: str, prefix: str, *, ttl: float, decode: bool = False) -> AsyncIterator[LeaseKeeper]:
    """A netra process's share of the cluster: its own client and keeper.
    Replies are bytes, as netra's client gives them, or str (``decode``)."""
    async with redis_client(url, decode_responses=decode) as redis, trio.open_nursery() as nursery:
        keeper = LeaseKeeper(redis, ttl=ttl, prefix=prefix)
        await nursery.start(keeper.run)
        yield keeper
        nursery.cancel_scope.cancel()


async def settled(limiter: SharedCapacityLimiter, borrowed: int = 0) -> None:
    """Wait until Redis counts ``borrowed`` places (a release reaches Redis
    a moment after release() returns)."""
    with trio.fail_after(2):
        while (await limiter.statistics()).cluster_borrowed_tokens != borrowed:
            await trio.sleep(0.005)


async def until_waiting(limiter: SharedCapacityLimiter, count: int = 1) -> None:
    with trio.fail_after(2):
        while limiter.tasks_waiting < count:
            await trio.sleep(0.005)


def test_exports_are_complete() -> None:
    classes = {
        name for name, value in vars(leases).items()
        if isinstance(value, type) and value.__module__ == leases.__name__ and not name.startswith("_")
    }
    assert set(netra.cluster.__all__) == classes | {"redis_client"}
    assert all(hasattr(netra.cluster, name) for name in netra.cluster.__all__)


async def test_capacity_is_never_exceeded_by_many_tasks_on_two_nodes(redis_url: str, prefix: str) -> None:
    total, per_node, rounds = 3, 15, 3
    holding = peak = 0
    over: list[int] = []

    async def worker(limiter: SharedCapacityLimiter) -> None:
        nonlocal holding, peak
        for _ in range(rounds):
            async with limiter.hold():
                holding += 1
                peak = max(peak, holding)
                cluster = (await limiter.statistics()).cluster_borrowed_tokens
                if cluster > total:
                    over.append(cluster)
                await trio.sleep(random.uniform(0, 0.01))
                holding -= 1

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            node(redis_url, prefix, ttl=1.0) as a,
            node(redis_url, prefix, ttl=1.0, decode=True) as b,
        ):
            limiters = [a.limiter("runs", total), b.limiter("runs", total)]
            async with trio.open_nursery() as nursery:
                for limiter in limiters:
                    for _ in range(per_node):
                        nursery.start_soon(worker, limiter)
            assert peak == total  # reached, never passed
            assert over == []
            assert [lim.borrowed_tokens for lim in limiters] == [0, 0]
            await settled(limiters[0])
            stats = await limiters[1].statistics()
            assert (stats.tasks_waiting, stats.borrowed_tokens) == (0, 0)


async def test_a_place_released_is_free_at_once_on_the_same_node(redis_url: str, prefix: str) -> None:
    # as with trio.CapacityLimiter: release() does not wait for Redis, yet an
    # acquire right after it, here, finds the place (it takes the release along)
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=5.0) as a:
            limiter = a.limiter("runs", 1)
            for _ in range(50):
                lease = await limiter.acquire_nowait()
                limiter.release(lease)
            await settled(limiter)


async def test_release_wakes_a_waiter_on_another_node_promptly(redis_url: str, prefix: str) -> None:
    # a TTL of 5 s: a waiter that got the place by its fallback poll would
    # take seconds, so a prompt one was woken by the release itself
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=5.0) as a, node(redis_url, prefix, ttl=5.0) as b:
            holder, waiter = a.limiter("model:openai", 1), b.limiter("model:openai", 1)
            held = await holder.acquire_nowait()
            with pytest.raises(trio.WouldBlock):
                await waiter.acquire_nowait()
            got: dict[str, float] = {}

            async def wait() -> None:
                lease = await waiter.acquire()
                got["at"] = trio.current_time()
                waiter.release(lease)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await until_waiting(waiter)
                await trio.sleep(0.05)  # parked, not in the middle of an attempt
                released_at = trio.current_time()
                holder.release(held)
            assert got["at"] - released_at < 0.25


async def test_a_dead_nodes_places_come_back_within_the_ttl(redis_url: str, prefix: str) -> None:
    ttl = 0.6
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=ttl) as survivor:
            waiter = survivor.limiter("tool:search", 2)
            # the node that dies: it takes both places, then its keeper stops
            # extending (cancelled) and its client is dropped, as when a
            # process is killed, without releasing anything
            async with redis_client(redis_url) as redis:
                async with trio.open_nursery() as nursery:
                    doomed = LeaseKeeper(redis, ttl=ttl, prefix=prefix)
                    await nursery.start(doomed.run)
                    limiter = doomed.limiter("tool:search", 2)
                    held = [await limiter.acquire(), await limiter.acquire()]
                    await trio.sleep(ttl / 2)  # past a refresh or so
                    nursery.cancel_scope.cancel()
                died_at = trio.current_time()
            assert all(lease.lost.is_set() for lease in held)  # its holders were told
            with pytest.raises(trio.WouldBlock):
                await waiter.acquire_nowait()  # not before they expire
            async with waiter.hold():
                waited = trio.current_time() - died_at
            assert waited < ttl + 0.2


CHILD = """
import sys, trio
from netra.cluster import LeaseKeeper, redis_client

async def main(url, prefix):
    async with redis_client(url) as redis, trio.open_nursery() as nursery:
        keeper = LeaseKeeper(redis, ttl=0.6, prefix=prefix)
        await nursery.start(keeper.run)
        limiter = keeper.limiter("runs", 2)
        await limiter.acquire()
        await limiter.acquire()
        print("held", flush=True)
        await trio.sleep_forever()

trio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_a_killed_process_leaks_no_capacity(redis_url: str, prefix: str) -> None:
    root = Path(__file__).resolve().parent.parent
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=0.6) as survivor:
            waiter = survivor.limiter("runs", 2)
            async with trio.open_nursery() as nursery:
                child = await nursery.start(partial(
                    trio.run_process, [sys.executable, "-c", CHILD, redis_url, prefix],
                    cwd=root, stdout=subprocess.PIPE, check=False,
                ))
                line = await child.stdout.receive_some(100)
                assert line.startswith(b"held"), line
                await settled(waiter, 2)
                os.kill(child.pid, signal.SIGKILL)
                killed_at = trio.current_time()
                await child.wait()
            assert child.returncode == -signal.SIGKILL
            first, second = await waiter.acquire(), await waiter.acquire()
            assert trio.current_time() - killed_at < 0.6 + 0.3
            waiter.release(first)
            waiter.release(second)


async def test_a_cancelled_waiter_holds_nothing(redis_url: str, prefix: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=1.0) as a, node(redis_url, prefix, ttl=1.0) as b:
            holder, waiter = a.limiter("user-runs:alice", 1), b.limiter("user-runs:alice", 1)
            held = await holder.acquire()
            with trio.move_on_after(0.3) as gave_up:
                await waiter.acquire()
            assert gave_up.cancelled_caught
            assert (waiter.tasks_waiting, waiter.borrowed_tokens) == (0, 0)
            holder.release(held)
            await settled(holder)
            assert b._rooms == {}  # nothing left behind for that resource


async def test_cancellation_at_any_moment_leaves_nothing_held(redis_url: str, prefix: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=5.0) as a, node(redis_url, prefix, ttl=5.0) as b:
            holder, limiter = a.limiter("runs", 1), b.limiter("runs", 1)
            outcomes: list[bool] = []  # whether the place was had when cancelled

            async def hold_forever() -> None:
                held = False
                try:
                    async with limiter.hold():
                        held = True
                        await trio.sleep_forever()
                finally:
                    outcomes.append(held)

            for round_ in range(30):
                # the place is given back at 0 to 1.5 ms, the waiter cancelled
                # at 0.75 ms: waiting, woken, asking, holding (a round trip is
                # ~0.3 ms on loopback)
                held = await holder.acquire()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hold_forever)
                    await trio.sleep(round_ * 0.00005)
                    holder.release(held)
                    await trio.sleep(max(0.0, 0.00075 - round_ * 0.00005))
                    nursery.cancel_scope.cancel()
                assert limiter.borrowed_tokens == limiter.tasks_waiting == 0
                await settled(limiter)  # at once, not when the TTL of 5 s runs out
            assert True in outcomes and False in outcomes  # it was had, and not


async def test_an_attempt_answered_too_late_gives_its_place_back(redis_url: str, prefix: str) -> None:
    # the script ran in Redis, but its answer came after the timeout: the
    # caller gets StoreError, and the place it may hold must not wait a TTL
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=5.0) as a:
            limiter = a.limiter("runs", 1)
            await limiter.statistics()  # the connection is open: only replies are late
            a.timeout = 0.00001
            with pytest.raises(StoreError, match="did not answer"):
                await limiter.acquire_nowait()
            a.timeout = 5.0
            assert limiter.borrowed_tokens == 0
            await settled(limiter)
            async with limiter.hold():
                pass


async def test_refresh_keeps_a_long_holder_past_several_ttls(redis_url: str, prefix: str) -> None:
    ttl = 0.5
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=ttl) as a, node(redis_url, prefix, ttl=ttl) as b:
            holder, other = a.limiter("runs", 1), b.limiter("runs", 1)
            lease = await holder.acquire()
            await trio.sleep(4 * ttl)
            assert not lease.lost.is_set()
            assert (await other.statistics()).cluster_borrowed_tokens == 1
            with pytest.raises(trio.WouldBlock):
                await other.acquire_nowait()
            holder.release(lease)
            async with other.hold():
                pass
            assert a.leases_lost == 0


async def test_a_lease_redis_no_longer_has_is_reported_lost(redis_url: str, prefix: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_url, prefix, ttl=5.0) as a:
            limiter = a.limiter("runs", 2)
            kept, taken = await limiter.acquire(), await limiter.acquire()
            # as if this process had stalled past the TTL and its place had
            # been swept and given to another
            assert await a.redis.zrem(a.key("runs"), [taken.token]) == 1
            await a.refresh()
            assert taken.lost.is_set() and not kept.lost.is_set()
            assert (limiter.borrowed_tokens, a.leases_lost) == (1, 1)
            limiter.release(taken)  # nothing to do, and no error
            limiter.release(kept)
            await settled(limiter)


async def test_leases_need_a_running_keeper(redis_url: str, prefix: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with redis_client(redis_url) as redis:
            keeper = LeaseKeeper(redis, ttl=1.0, prefix=prefix)
            with pytest.raises(RuntimeError, match="while the LeaseKeeper runs"):
                await keeper.limiter("runs", 1).acquire_nowait()
    with pytest.raises(ValueError, match="at least 1"):
        keeper.limiter("runs", 0)
    with pytest.raises(ValueError, match="ttl"):
        LeaseKeeper(redis, ttl=0)


# coredis leaves the buffers of a connection that never connected unclosed,
# and they warn when collected: collected here, where that is expected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_keeper_without_redis_says_so_at_once() -> None:
    failure: BaseException | None = None
    with trio.fail_after(TEST_TIMEOUT):
        try:
            async with redis_client("redis://127.0.0.1:1/0") as nowhere:
                await LeaseKeeper(nowhere, ttl=1.0, timeout=2.0).run()
        except* StoreError as group:
            failure = group.exceptions[0]
    assert failure is not None and "did not answer" in str(failure)
    del failure
    gc.collect()
