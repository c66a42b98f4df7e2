"""A cluster of netra nodes on one Redis and one PostgreSQL.

Each node here is a whole netra server (its own hub, store pool, lease
keeper and listening socket) in this process; one test kills a real
``netra serve`` process with SIGKILL. The limits must hold across the nodes
as on one, a cancel must reach a run wherever it runs, and a dead node's
capacity and runs must come back by themselves. Leases expire by Redis's
clock in real time, so these tests run in real time with a short lease TTL,
each under an absolute ``trio.fail_after``. Skipped, with the reason, when
no Redis or no PostgreSQL answers (see test_redis_trio.py and _backends.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import psycopg
import pytest
import trio

from netra.client import ConnectionClosed, RunRefused, connect
from netra.cluster import redis_client
from netra.hub import Hub
from netra.server import Server
from netra.testing import TEST_SECRET, config_for_tests, open_server, token_for
from netra.tools import tool

from ._backends import PgDatabase, uid
from .conftest import settle
from .rawws import open_raw
from .test_redis_trio import prefix as prefix, redis_url as redis_url  # fixtures

TEST_TIMEOUT = 30.0
TTL = 1.0
SLEEP = '[[tool:sleep {"ms": %d}]]'


@pytest.fixture
def cluster_config(redis_url: str, prefix: str, pg_database: PgDatabase):
    def make(**overrides):
        values = dict(
            database_url=pg_database.url, store_pool_size=4, redis_url=redis_url, redis_prefix=prefix,
            cluster_lease_ttl_s=TTL,
        )
        return config_for_tests(**(values | overrides))

    return make


@asynccontextmanager
async def nodes(make, count: int = 2, *, extra_tools=(), **overrides) -> AsyncIterator[list[Server]]:
    async with trio.open_nursery() as nursery:
        servers: list[Server] = []
        stops: list[trio.Event] = []
        for _ in range(count):
            ready = trio.Event()
            stop = trio.Event()
            stops.append(stop)

            async def one(ready=ready, stop=stop):
                async with open_server(make(**overrides), extra_tools=list(extra_tools)) as server:
                    servers.append(server)
                    ready.set()
                    await stop.wait()

            nursery.start_soon(one)
            await ready.wait()
        try:
            yield servers
        finally:
            for stop in stops:
                stop.set()


async def events_until(run, kind: str) -> list:
    seen = []
    async for event in run:
        seen.append(event)
        if event.type == kind:
            return seen
    raise AssertionError(f"the run ended before {kind}: {[e.type for e in seen]}")


async def test_cluster_mode_refuses_a_store_other_nodes_cannot_share(redis_url, prefix) -> None:
    for url in ("none", "sqlite:///unused.db"):
        with pytest.raises(ValueError, match="needs PostgreSQL"):
            Hub.build(config_for_tests(database_url=url, redis_url=redis_url, redis_prefix=prefix))


async def test_runs_per_user_hold_across_nodes(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config, max_runs_per_user=1) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "u")) as on_b:
                first = on_a.run(SLEEP % 600)
                await events_until(first, "tool_executing")
                second = await on_b.collect("hello")
                kinds = [e.type for e in second]
                assert kinds[0] == "run_queued"  # waited for the run on the other node
                assert kinds[-1] == "agent_completed"
                assert [e.type async for e in first][-1] == "agent_completed"
                # another user is not held back by u's cap
                async with connect(b.ws_url, token_for(b, "v")) as other:
                    third = on_a.run(SLEEP % 600)
                    await events_until(third, "tool_executing")
                    assert [e.type for e in await other.collect("hi")][0] == "agent_started"
                    assert [e.type async for e in third][-1] == "agent_completed"


async def test_global_run_capacity_holds_across_nodes(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config, max_runs=1) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "v")) as on_b:
                first = on_a.run(SLEEP % 600)
                await events_until(first, "tool_executing")
                second = await on_b.collect("hello")
                assert [e.type for e in second][0] == "run_queued"
                assert second[-1].type == "agent_completed"
                assert [e.type async for e in first][-1] == "agent_completed"


async def test_a_tools_concurrency_holds_across_nodes(cluster_config) -> None:
    calls = {"now": 0, "most": 0, "done": 0}

    @tool(concurrency=1)
    async def one_at_a_time(ms: int) -> str:
        """Holds the one place of its tool for a while."""
        calls["now"] += 1
        calls["most"] = max(calls["most"], calls["now"])
        await trio.sleep(ms / 1000)
        calls["now"] -= 1
        calls["done"] += 1
        return "done"

    text = '[[tool:one_at_a_time {"ms": 200}]]'
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config, extra_tools=[one_at_a_time]) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "v")) as on_b:
                async with trio.open_nursery() as nursery:
                    for conn in (on_a, on_b, on_a, on_b):
                        nursery.start_soon(conn.collect, text)
    assert calls == {"now": 0, "most": 1, "done": 4}


async def test_model_calls_hold_across_nodes(cluster_config) -> None:
    """max_model_calls is the cluster's: a model turn on one node waits
    for the one streaming on the other."""
    text = "[[stream:10]] a story"
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config, max_model_calls=1, scripted_delay_ms=30) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "v")) as on_b:
                spans: dict[str, list[float]] = {}

                async def timed(name: str, conn) -> None:
                    async for event in conn.run(text):
                        if event.type == "text_delta":
                            spans.setdefault(name, []).append(trio.current_time())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(timed, "a", on_a)
                    nursery.start_soon(timed, "b", on_b)
    first, second = sorted(spans.values())
    assert len(first) == len(second) == 10
    assert second[0] > first[-1]  # the turns did not overlap


async def test_connections_per_user_hold_across_nodes(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config, max_connections_per_user=1) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")):
                with pytest.raises(ConnectionClosed) as closed:
                    async with connect(b.ws_url, token_for(b, "u")) as conn:
                        await conn.collect("hello")
                assert closed.value.code == 4429
                async with connect(b.ws_url, token_for(b, "v")) as other:  # another user is not affected
                    assert (await other.collect("hi"))[-1].type == "agent_completed"
            # the place comes back when the connection closes
            with trio.fail_after(5):
                while True:
                    try:
                        async with connect(b.ws_url, token_for(b, "u")) as again:
                            assert (await again.collect("hi"))[-1].type == "agent_completed"
                            break
                    except ConnectionClosed:
                        await trio.sleep(0.05)


async def test_a_cancel_on_one_node_reaches_the_run_on_another(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "u")) as on_b:
                run = on_a.run(SLEEP % 20000)
                started = await events_until(run, "tool_executing")
                await on_b.cancel(run_id=started[0].raw["run_id"])
                rest = [e async for e in run]
                assert rest[-1].type == "agent_cancelled" and rest[-1].raw["reason"] == "client"
                # by thread id too
                run = on_a.run(SLEEP % 20000, thread_id=started[0].raw["thread_id"])
                await events_until(run, "tool_executing")
                await on_b.cancel(thread_id=started[0].raw["thread_id"])
                assert [e async for e in run][-1].raw["reason"] == "client"
                # nothing there: a clear answer
                with pytest.raises(RunRefused) as refused:
                    await on_b.send({"type": "cancel", "run_id": "run_nope", "id": "c1"})
                    await on_b.collect("x", id="c1")
                assert refused.value.code == "not_found"


async def test_a_message_id_is_accepted_once_across_nodes(cluster_config) -> None:
    """A client that retries a message on another node (its connection
    dropped and the balancer chose again) starts no second run."""
    user = uid("u")
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config) as (a, b):
            async with connect(a.ws_url, token_for(a, user)) as on_a, connect(b.ws_url, token_for(b, user)) as on_b:
                first = await on_a.collect("hello", id="m1")
                thread = first[0].raw["thread_id"]
                with pytest.raises(RunRefused) as refused:
                    await on_b.collect("hello", id="m1")  # the retry of a thread-starting message
                assert refused.value.code == "bad_request"
                assert refused.value.raw["thread_id"] == thread
                second = await on_b.collect("more", thread_id=thread, id="m2")
                with pytest.raises(RunRefused):
                    await on_a.collect("more", thread_id=thread, id="m2")
                assert second[-1].type == "agent_completed"


async def test_another_users_cancel_never_reaches_a_run(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "v")) as on_b:
                run = on_a.run(SLEEP % 500)
                started = await events_until(run, "tool_executing")
                with pytest.raises(RunRefused) as refused:
                    await on_b.send({"type": "cancel", "run_id": started[0].raw["run_id"], "id": "c1"})
                    await on_b.collect("x", id="c1")
                assert refused.value.code == "not_found"
                assert [e async for e in run][-1].type == "agent_completed"


async def test_a_thread_runs_one_at_a_time_across_nodes(cluster_config) -> None:
    """interrupt cancels the thread's run on the other node; reject refuses
    while it runs; enqueue waits for it."""
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config) as (a, b):
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "u")) as on_b:
                run = on_a.run(SLEEP % 20000)
                thread = (await events_until(run, "tool_executing"))[0].raw["thread_id"]
                with pytest.raises(RunRefused) as refused:
                    await on_b.collect("hi", thread_id=thread, multitask="reject")
                assert refused.value.code == "run_in_progress"
                interrupting = await on_b.collect("hi", thread_id=thread, multitask="interrupt")
                assert interrupting[-1].type == "agent_completed"
                rest = [e async for e in run]
                assert rest[-1].type == "agent_cancelled" and rest[-1].raw["reason"] == "interrupted"
                first = on_a.run(SLEEP % 500, thread_id=thread)
                await events_until(first, "tool_executing")
                waited = await on_b.collect("after", thread_id=thread)
                assert waited[0].type == "run_queued" and waited[-1].type == "agent_completed"
                assert [e async for e in first][-1].type == "agent_completed"


async def test_metrics_show_the_node_and_the_cluster(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with nodes(cluster_config) as (a, b):
            async with connect(b.ws_url, token_for(b, "u")), httpx.AsyncClient() as http:
                # each node adds up the others' counts at its heartbeat (every TTL / 3)
                with trio.fail_after(TTL * 3):
                    while True:
                        text = (await http.get(a.http_url + "/metrics")).text
                        values = {
                            line.split()[0]: float(line.split()[1])
                            for line in text.splitlines() if line and not line.startswith("#")
                        }
                        if values['netra_cluster{kind="connections"}'] == 1:
                            break
                        await trio.sleep(0.05)
            assert values['netra_cluster{kind="nodes"}'] == 2
            assert values["netra_connections_open"] == 0  # node a's own


@asynccontextmanager
async def serve_process(config_env: dict[str, str]) -> AsyncIterator[tuple[subprocess.Popen, str]]:
    """``netra serve`` in a process of its own; its URL once it listens."""
    env = {**os.environ, **config_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "netra", "serve", "--port", "0"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = None
        while url is None:
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            if not line:
                raise AssertionError("netra serve ended before it listened")
            found = re.search(r"listening on (http://[0-9.]+:[0-9]+)", line)
            if found:
                url = found.group(1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_a_node_killed_mid_run_gives_back_its_capacity_and_its_runs_are_node_lost(
    cluster_config, redis_url, prefix, pg_database
) -> None:
    with trio.fail_after(TEST_TIMEOUT * 2):
        env = {
            "NETRA_DATABASE_URL": pg_database.url, "NETRA_REDIS_URL": redis_url, "NETRA_REDIS_PREFIX": prefix,
            "NETRA_CLUSTER_LEASE_TTL_S": str(TTL), "NETRA_JWT_SECRET": TEST_SECRET,
            "NETRA_CHAOS_TOOLS": "true", "NETRA_MAX_RUNS_PER_USER": "1", "NETRA_MAX_RUNS": "2",
        }
        async with nodes(cluster_config, 1, max_runs_per_user=1, max_runs=2) as (a,):
            async with serve_process(env) as (proc, url):
                ws_url = url.replace("http://", "ws://") + "/ws"
                async with connect(a.ws_url, token_for(a, "healthy")) as healthy:
                    doomed_run_id = None
                    async with trio.open_nursery() as nursery:
                        async def doomed() -> None:
                            nonlocal doomed_run_id
                            with pytest.raises(ConnectionClosed):
                                async with connect(ws_url, token_for(a, "u"), resume=False) as conn:
                                    run = conn.run(SLEEP % 20000)
                                    started = await events_until(run, "tool_executing")
                                    doomed_run_id = started[0].raw["run_id"]
                                    os.kill(proc.pid, signal.SIGKILL)
                                    async for _ in run:
                                        pass
                        nursery.start_soon(doomed)
                        # the healthy user on the other node runs on, untouched
                        for _ in range(3):
                            events = await healthy.collect("still here")
                            assert events[-1].type == "agent_completed"
                    assert doomed_run_id is not None
                    # u's place and a global place come back within the lease TTL:
                    # u runs again, on the surviving node, without waiting for ever
                    async with connect(a.ws_url, token_for(a, "u")) as again:
                        events = await again.collect("back")
                        assert events[-1].type == "agent_completed"
                    # the dead node's run is recorded failed, cause node_lost
                    with trio.fail_after(TTL * 4 + 5):
                        while True:
                            row = await trio.to_thread.run_sync(_run_row, pg_database.url, doomed_run_id)
                            if row and row[0] != "running":
                                break
                            await trio.sleep(0.1)
                    assert row == ("failed", "node_lost")
                    assert a.hub.snapshot()["runs_borrowed"] == 0
                await settle(a.hub)


def _run_row(url: str, run_id: str) -> tuple[str, str | None] | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT status, error_code FROM runs WHERE id = %s", (run_id,)).fetchone()
    return tuple(row) if row else None


async def test_netra_serve_says_in_one_line_when_the_clusters_redis_does_not_answer(pg_database) -> None:
    env = {
        **os.environ, "NETRA_DATABASE_URL": pg_database.url, "NETRA_REDIS_URL": "redis://127.0.0.1:1/0",
        "NETRA_JWT_SECRET": TEST_SECRET,
    }
    with trio.fail_after(TEST_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-m", "netra", "serve", "--port", "0"], env=env, capture_stdout=True,
            capture_stderr=True, check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 2
    assert "netra: cannot start: the cluster store (Redis) did not answer" in err
    assert "Traceback" not in err


# -- sessions resumed on another node ------------------------------------------------


def resume_frame(connected: dict, last_seq: int, **changes) -> dict:
    return {"type": "resume", "session_id": connected["session_id"],
            "resume_token": connected["resume_token"], "last_seq": last_seq, **changes}


async def read_until(raw, kind: str) -> list[dict]:
    events = []
    while not events or events[-1]["type"] != kind:
        events.append(await raw.read_event())
    return events


async def test_a_session_dropped_on_one_node_resumes_on_another_with_nothing_lost(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        ann = uid("ann")
        async with nodes(cluster_config, resume_window_s=30.0, scripted_delay_ms=20) as (a, b):
            first = await open_raw(a.ws_url, token_for(a, ann))
            connected = await first.read_event()
            await first.send_json({"type": "user_message", "text": "[[stream:60]] a story", "id": "s1"})
            seen = []
            while sum(e["type"] == "text_delta" for e in seen) < 5:
                seen.append(await first.read_event())
            first.reset()  # the network goes away: no close frame
            second = await open_raw(b.ws_url, token_for(b, ann))
            assert (await second.read_event())["type"] == "connected"
            await second.send_json(resume_frame(connected, last_seq=seen[-1]["seq"]))
            resumed = await second.read_event()
            assert resumed["type"] == "resumed", resumed
            assert resumed["seq"] == seen[-1]["seq"] and resumed["session_id"] == connected["session_id"]
            rest = await read_until(second, "agent_completed")
            events = seen + rest
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
            assert "".join(e["delta"] for e in events if e["type"] == "text_delta") == events[-1]["text"]
            # the session goes on over the relay: a new message, and a cancel
            await second.send_json({"type": "user_message", "text": SLEEP % 20000, "id": "s2"})
            executing = await read_until(second, "tool_executing")
            await second.send_json({"type": "cancel", "run_id": executing[-1]["run_id"]})
            ended = await read_until(second, "agent_cancelled")
            assert ended[-1]["reason"] == "client"
            seqs = [e["seq"] for e in [*rest, *executing, *ended]]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            await second.send_frame(0x8, (1000).to_bytes(2, "big"))  # a close: the session ends
            with trio.fail_after(5):
                while a.hub.sessions or b.hub.sessions:
                    await trio.sleep(0.02)
            assert a.hub.metrics.sessions_resumed.labels("resumed")._value.get() == 1
            assert b.hub.metrics.sessions_resumed.labels("relayed")._value.get() == 1


async def dropped_mid_stream(server: Server, user: str, chunks: int, read: int) -> tuple[dict, list[dict]]:
    """A session of ``user`` on ``server`` whose TCP connection is reset after
    ``read`` events of a streamed answer: its ``connected`` and those events."""
    first = await open_raw(server.ws_url, token_for(server, user))
    connected = await first.read_event()
    await first.send_json({"type": "user_message", "text": f"[[stream:{chunks}]] a story", "id": "s1"})
    seen = [await first.read_event() for _ in range(read)]
    first.reset()  # the network goes away: no close frame
    return connected, seen


async def test_a_relayed_session_dropped_again_resumes_on_its_own_node(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        ann = uid("ann")
        async with nodes(cluster_config, resume_window_s=30.0, scripted_delay_ms=20) as (a, b):
            connected, seen = await dropped_mid_stream(a, ann, chunks=80, read=4)
            second = await open_raw(b.ws_url, token_for(b, ann))
            await second.read_event()
            await second.send_json(resume_frame(connected, last_seq=seen[-1]["seq"]))
            more = [await second.read_event() for _ in range(6)]
            assert more[0]["type"] == "resumed"
            second.reset()  # dropped again, on the relay
            third = await open_raw(a.ws_url, token_for(a, ann))
            await third.read_event()
            with trio.fail_after(5):  # the owner learns of the drop from the relay's "end"
                while True:
                    await third.send_json(resume_frame(connected, last_seq=more[-1]["seq"], id="r"))
                    answer = await third.read_event()
                    if answer["type"] == "resumed":
                        break
                    assert answer["type"] == "error" and answer["code"] == "not_found"
                    await trio.sleep(0.05)
            rest = await read_until(third, "agent_completed")
            events = [*seen, *more[1:], *rest]
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_a_resume_on_another_node_is_refused_for_another_user_or_a_wrong_token(cluster_config) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        ann = uid("ann")
        async with nodes(cluster_config, resume_window_s=30.0, scripted_delay_ms=20) as (a, b):
            connected, seen = await dropped_mid_stream(a, ann, chunks=40, read=3)
            for n, (user, changes) in enumerate(((uid("bob"), {}), (ann, {"resume_token": "wrong"}),
                                  (ann, {"session_id": "ses_000000000000ffffffff"}))):
                other = await open_raw(b.ws_url, token_for(b, user))
                await other.read_event()
                await other.send_json(resume_frame(connected, last_seq=seen[-1]["seq"], id="r", **changes))
                refused = await other.read_event()
                assert refused["type"] == "error" and refused["code"] == "not_found", refused
                assert refused["ref"] == "r"
                # nothing changed: the connection works as any other
                await other.send_json({"type": "user_message", "text": "hi", "id": f"h{n}"})
                assert (await read_until(other, "agent_completed"))[-1]["type"] == "agent_completed"
                other.reset()
            # and the session is still there for its own user
            own = await open_raw(b.ws_url, token_for(b, ann))
            await own.read_event()
            await own.send_json(resume_frame(connected, last_seq=seen[-1]["seq"]))
            assert (await own.read_event())["type"] == "resumed"
            assert (await read_until(own, "agent_completed"))[-1]["type"] == "agent_completed"


async def test_a_node_survives_its_redis_connections_being_cut(cluster_config, redis_url) -> None:
    """Redis restarts, a proxy drops connections: every connection of one
    node is killed from Redis's side. The node goes on serving, and once it
    has reconnected its cancels and limits work across the cluster again."""
    with trio.fail_after(TEST_TIMEOUT * 2):
        async with nodes(cluster_config) as (a, b):
            async with redis_client(redis_url, decode_responses=True) as admin:
                name = f"netra:{a.hub.store.node_id}"
                ids = [c["id"] for c in await admin.client_list() if c.get("name") == name]
                assert ids  # the node's pool, its lease keeper's and its control channel's pub/sub
                for client_id in ids:
                    await admin.client_kill(identifier=int(client_id))
            async with connect(a.ws_url, token_for(a, "u")) as on_a, connect(b.ws_url, token_for(b, "u")) as on_b:
                assert (await on_a.collect("hello"))[-1].type == "agent_completed"
                with trio.fail_after(10):  # subscribed again: a cancel from b reaches a's run
                    while True:
                        run = on_a.run(SLEEP % 20000)
                        started = await events_until(run, "tool_executing")
                        await on_b.cancel(run_id=started[0].raw["run_id"])
                        with trio.move_on_after(1.5) as waited:
                            ended = [e async for e in run]
                        if not waited.cancelled_caught:
                            break
                        await on_a.cancel(run_id=started[0].raw["run_id"])  # lost meanwhile: tidy up
                        assert [e async for e in run][-1].type == "agent_cancelled"
                assert ended[-1].type == "agent_cancelled" and ended[-1].raw["reason"] == "client"
