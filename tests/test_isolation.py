"""Isolation by construction, under stress.

Every scenario runs through a real server while a healthy control user sends
messages the whole time. The control user must lose nothing (every run
completes with all five events) and stay fast, and after each scenario every
limiter, counter and connection task must be back to zero.
"""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio_websocket

from netra.client import ConnectionClosed, RunRefused, connect
from netra.metrics import live_tasks
from netra.testing import config_for_tests, open_server, token_for
from netra.tools import tool

from .conftest import by_label, settle
from .rawws import OP_TEXT, open_raw
from .test_golden_path import CALC, assert_run_shape

HANG = "[[tool:hang {}]]"


@attrs.define(eq=False)
class Control:
    """A healthy user running calculator messages back to back."""

    server: object
    runs: list[float] = attrs.field(factory=list)
    failures: list[str] = attrs.field(factory=list)
    stop: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with connect(self.server.ws_url, token_for(self.server, "control"), record=True) as conn:
            task_status.started()
            while not self.stop.is_set() or len(self.runs) < 3:
                start = trio.current_time()
                try:
                    events = await conn.collect(CALC)
                    assert_run_shape(events)
                except Exception as exc:  # recorded, asserted on below
                    self.failures.append(repr(exc))
                    return
                self.runs.append(trio.current_time() - start)
                await trio.sleep(0.15)  # a brisk human, well inside the default rate
            seqs = [r.seq for r in conn.received]
            if seqs != list(range(1, len(seqs) + 1)):
                self.failures.append("seq gap")
            if any(r.raw.get("user_id", "control") != "control" for r in conn.received):
                self.failures.append("foreign event")


@asynccontextmanager
async def scenario(*, control_bound_s: float = 1.0, extra_tools=(), **overrides):
    """A server, a control user beside the scenario, and the checks after it."""
    async with open_server(config_for_tests(**overrides), extra_tools=list(extra_tools)) as server:
        control = Control(server)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(control.run)
                try:
                    yield server
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                finally:
                    control.stop.set()
        assert not control.failures, control.failures
        assert len(control.runs) >= 3
        assert max(control.runs) < control_bound_s, f"control user slowed down: {max(control.runs):.3f}s"
        await settle(server.hub)
        assert server.hub.metrics.isolation_violations._value.get() == 0
        # failure containment: whatever failed in the scenario, no run was
        # stopped by anything outside its own user (or the operator)
        assert by_label(server.hub.metrics.runs_affected) == {}


async def until(conn_events, kind: str):
    async for event in conn_events:
        if event.type == kind:
            return event
    raise AssertionError(f"no {kind}")


# -- failures inside a run ---------------------------------------------------------


async def test_tool_raising():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            events = await conn.collect("[[tool:fail {}]]")
            assert [e for e in events if e.type == "tool_completed"][0].raw["error"]
            assert events[-1].type == "agent_completed"


async def test_tool_hanging_past_its_timeout():
    async with scenario(tool_timeout_s=0.3) as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            events = await conn.collect(HANG)
            done = [e for e in events if e.type == "tool_completed"][0]
            assert "timed out" in done.raw["error"]
            assert events[-1].type == "agent_completed"
            assert "hang failed" in events[-1].raw["text"]


async def test_model_failing_mid_stream():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            events = await conn.collect("[[model:fail_midstream]]")
            assert [e.type for e in events].count("text_delta") == 1
            assert events[-1].raw["code"] == "llm_error"


async def test_model_stalling_hits_the_idle_timeout():
    async with scenario(model_idle_timeout_s=0.3) as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            events = await conn.collect("[[model:stall]]")
            assert events[-1].type == "agent_error" and events[-1].raw["code"] == "llm_error"


async def test_run_timeout():
    async with scenario(run_timeout_s=0.4) as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            events = await conn.collect(HANG)
            types = [e.type for e in events]
            assert types[-1] == "agent_error" and events[-1].raw["code"] == "timeout"
            # the cancelled tool call still got its tool_completed, before the terminal event
            assert types.count("tool_executing") == types.count("tool_completed") == 1
            assert "cancelled" in [e for e in events if e.type == "tool_completed"][0].raw["error"]


async def test_output_too_large():
    async with scenario(max_output_bytes=64) as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            events = await conn.collect("[[stream:200]] " + "long " * 40)
            assert events[-1].type == "agent_error" and events[-1].raw["code"] == "too_large"


async def test_tool_call_limit_is_a_failed_call():
    async with scenario(max_tool_calls=1) as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            text = '[[tool:calculator {"expression": "1+1"}]] [[tool:calculator {"expression": "2+2"}]]'
            events = await conn.collect(text)
            done = [e for e in events if e.type == "tool_completed"]
            assert done[0].raw["result"] == 2 and "limit" in done[1].raw["error"]
            assert events[-1].type == "agent_completed"


# -- cancellation and multitask --------------------------------------------------


async def test_cancel_mid_tool():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            run = conn.run(HANG)
            executing = await until(run, "tool_executing")
            asked = trio.current_time()
            await conn.cancel(run_id=executing.raw["run_id"])
            rest = [e async for e in run]
            assert trio.current_time() - asked < 0.5  # the contract says 100 ms; bench/ measures it
            assert [e.type for e in rest] == ["tool_completed", "agent_cancelled"]
            assert rest[0].raw["error"] == "cancelled"
            assert rest[-1].raw["reason"] == "client"


async def test_cancel_by_thread_id():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            run = conn.run(HANG)
            started = await until(run, "tool_executing")
            await conn.cancel(thread_id=started.raw["thread_id"])
            rest = [e async for e in run]
            assert rest[-1].raw["reason"] == "client"
            with pytest.raises(RunRefused):  # nothing left to cancel: a clear answer
                await conn.send({"type": "cancel", "run_id": "run_nope", "id": "c1"})
                await conn.collect("x", id="c1")


async def test_duplicate_message_ids_start_no_second_run():
    """With no database the memory store remembers accepted ids by the same
    rules as the SQL stores; a duplicate's error names the first run and its
    thread, and leaves other users alone."""
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn, \
                connect(server.ws_url, token_for(server, "v")) as other:
            first = await conn.collect(CALC, id="m1")
            run_id, thread = first[0].raw["run_id"], first[0].raw["thread_id"]
            with pytest.raises(RunRefused) as refused:
                await conn.collect(CALC, id="m1")  # the retry of a thread-starting message
            assert refused.value.code == "bad_request"
            assert (refused.value.raw["run_id"], refused.value.raw["thread_id"]) == (run_id, thread)
            with pytest.raises(RunRefused) as refused:  # the same id on the thread it started
                await conn.collect(CALC, id="m1", thread_id=thread)
            assert refused.value.raw["run_id"] == run_id
            on_thread = await conn.collect(CALC, id="m2", thread_id=thread)
            with pytest.raises(RunRefused) as refused:
                await conn.collect(CALC, id="m2", thread_id=thread)
            assert refused.value.raw["run_id"] == on_thread[0].raw["run_id"]
            assert (await other.collect(CALC, id="m1"))[-1].type == "agent_completed"


async def test_interrupt():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            first = conn.run(HANG)
            started = await until(first, "tool_executing")
            thread = started.raw["thread_id"]
            second = await conn.collect(CALC, thread_id=thread, multitask="interrupt")
            rest = [e async for e in first]
            assert rest[-1].type == "agent_cancelled" and rest[-1].raw["reason"] == "interrupted"
            assert second[-1].type == "agent_completed"


async def test_reject():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            first = conn.run(HANG)
            started = await until(first, "tool_executing")
            with pytest.raises(RunRefused) as refused:
                await conn.collect(CALC, thread_id=started.raw["thread_id"], multitask="reject")
            assert refused.value.code == "run_in_progress"
            assert refused.value.raw["run_id"] == started.raw["run_id"]
            await conn.cancel(run_id=started.raw["run_id"])
            assert [e async for e in first][-1].type == "agent_cancelled"


async def test_enqueue():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            first = conn.run('[[tool:sleep {"ms": 200}]]')
            started = await until(first, "agent_started")
            second = await conn.collect(CALC, thread_id=started.raw["thread_id"], multitask="enqueue")
            first_rest = [e async for e in first]
            assert first_rest[-1].type == "agent_completed"
            assert second[0].type == "run_queued" and second[0].raw["position"] >= 1
            assert second[1].type == "agent_started"
            assert second[1].ts >= first_rest[-1].ts
            assert_run_shape(second[1:])


async def test_cancelled_while_queued_keeps_the_run_shape():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            first = conn.run(HANG)
            started = await until(first, "tool_executing")
            second = conn.run(CALC, thread_id=started.raw["thread_id"], multitask="enqueue")
            queued = await until(second, "run_queued")
            await conn.cancel(run_id=queued.raw["run_id"])
            shape = [e.type for e in [e async for e in second]]
            assert shape == ["agent_started", "agent_thinking", "agent_cancelled"]
            await conn.cancel(run_id=started.raw["run_id"])
            assert [e async for e in first][-1].type == "agent_cancelled"


async def test_repeated_message_id_starts_no_second_run():
    async with scenario() as server:
        async with connect(server.ws_url, token_for(server, "u")) as conn:
            first = await conn.collect(CALC, id="same-id")
            assert first[-1].type == "agent_completed"
            with pytest.raises(RunRefused) as refused:
                await conn.collect(CALC, id="same-id")
            assert refused.value.raw["run_id"] == first[0].raw["run_id"]
            assert server.hub.metrics.runs_finished.labels("completed", "")._value.get() >= 1


# -- limits ----------------------------------------------------------------------


async def test_flood_above_rate():
    async with scenario(rate_per_s=5, rate_burst=5, rate_abuse_limit=20) as server:
        async with connect(server.ws_url, token_for(server, "flood"), record=True) as conn:
            for i in range(10):
                await conn.send({"type": "ping", "id": f"p{i}"})
            with trio.fail_after(5):
                while len(conn.received) < 11:
                    await trio.sleep(0.01)
            kinds = [r.type for r in conn.received[1:11]]
            assert kinds.count("pong") >= 5 and "error" in kinds
            limited = [r for r in conn.received if r.type == "error"][0]
            assert limited.raw["code"] == "rate_limited" and limited.raw["retry_after_ms"] > 0
            assert limited.raw["ref"].startswith("p")  # the client can tell which message was refused
            with pytest.raises(ConnectionClosed):
                for i in range(200):  # sustained abuse, until the server hangs up
                    await conn.send({"type": "ping"})
                    await trio.sleep(0.001)
            closed = await conn.wait_closed()
            assert closed.code == 4429


async def test_a_flooder_whose_replies_fill_its_queue_is_closed_4429_not_4430():
    """The abuse limit is out of reach here and the queue is tiny, so the
    queue fills with refusals first: the flood, not the reading, is the cause."""
    overrides = dict(rate_per_s=5, rate_burst=5, rate_abuse_limit=10**6, outbox_size=4, write_timeout_s=0.5)
    async with scenario(**overrides) as server:
        raw = await open_raw(server.ws_url, token_for(server, "flood-deaf"), rcvbuf=4096)
        await raw.read_event()
        # the server's side of the socket buffers little too, so that the
        # replies (pongs, rate_limited errors) back up within a second
        [session] = [x for x in server.hub.sessions if x.identity.user_id == "flood-deaf"]
        session.transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        frame = json.dumps({"type": "ping", "id": "x" * 128}).encode()
        with trio.move_on_after(10):
            try:
                while "flood-deaf" in server.hub.users:
                    await raw.send_frame(OP_TEXT, frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the server hung up
        with trio.fail_after(10):
            while "flood-deaf" in server.hub.users:
                await trio.sleep(0.02)
        assert server.hub.metrics.connections_closed.labels("4429")._value.get() == 1
        assert server.hub.metrics.slow_consumer_closes._value.get() == 0
        await raw.stream.aclose()


async def test_over_limit_connections():
    async with scenario(max_connections_per_user=2) as server:
        token = token_for(server, "many")
        async with connect(server.ws_url, token), connect(server.ws_url, token):
            with pytest.raises(ConnectionClosed) as refused:
                async with connect(server.ws_url, token):
                    pass
            assert refused.value.code == 4429
        async with connect(server.ws_url, token) as again:  # freed on close
            assert again.user_id == "many"


async def test_over_limit_runs_per_user_queue_then_busy():
    async with scenario(max_runs_per_user=2, max_queued_runs_per_user=1) as server:
        async with connect(server.ws_url, token_for(server, "greedy")) as conn:
            hogs = [conn.run(HANG), conn.run(HANG)]
            for hog in hogs:
                await until(hog, "tool_executing")
            waiting = conn.run(CALC)
            queued = await until(waiting, "run_queued")
            assert queued.raw["position"] == 1
            with pytest.raises(RunRefused) as refused:
                await conn.collect(CALC)
            assert refused.value.code == "busy" and refused.value.raw["retry_after_ms"] > 0
            first_hog = server.hub.users["greedy"].runs
            await conn.cancel(run_id=next(r.id for r in first_hog if r.executing))
            rest = [e async for e in waiting]
            assert rest[0].type == "agent_started" and rest[-1].type == "agent_completed"
            for r in list(server.hub.users["greedy"].runs):
                r.cancel("client", by="greedy")


async def test_global_capacity_exhausted_queues_then_serves():
    async with scenario(max_runs=2, max_runs_per_user=1, control_bound_s=5.0) as server:
        async with connect(server.ws_url, token_for(server, "a")) as a, \
                connect(server.ws_url, token_for(server, "b")) as b, \
                connect(server.ws_url, token_for(server, "victim")) as victim:
            hog_a, hog_b = a.run(HANG), b.run(HANG)
            await until(hog_a, "tool_executing")
            await until(hog_b, "tool_executing")
            run = victim.run(CALC)
            events = []
            async for event in run:
                events.append(event)
                if event.type == "run_queued":
                    break
            await a.cancel(run_id=server.hub.users["a"].runs.copy().pop().id)
            events += [e async for e in run]
            assert [e.type for e in events][:2] == ["run_queued", "agent_started"]
            assert events[-1].type == "agent_completed"
            await b.cancel(run_id=server.hub.users["b"].runs.copy().pop().id)
            assert server.hub.metrics.limiter_waits.labels("global")._value.get() >= 1


async def test_per_tool_concurrency():
    inside, most = [0], [0]

    @tool(concurrency=1)
    async def exclusive() -> str:
        """Counts how many calls are inside at once."""
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        await trio.sleep(0.05)
        inside[0] -= 1
        return "done"

    async with scenario(extra_tools=[exclusive]) as server:
        async with trio.open_nursery() as nursery:
            for u in range(4):
                async def one(name=f"t{u}"):
                    async with connect(server.ws_url, token_for(server, name)) as conn:
                        events = await conn.collect("[[tool:exclusive {}]]")
                        assert events[-1].type == "agent_completed"
                nursery.start_soon(one)
        assert most[0] == 1


# -- the connection itself ---------------------------------------------------------


async def test_slow_consumer_is_closed_and_freed():
    """A client that stops reading while its run streams: its writes stop
    draining, and write_timeout_s later its run is cancelled and it is
    closed 4430 (cut, since it reads nothing), all within a few seconds."""
    overrides = dict(write_timeout_s=0.5, close_timeout_s=0.5, max_output_bytes=10**8, scripted_delay_ms=1)
    async with scenario(**overrides) as server:
        raw = await open_raw(server.ws_url, token_for(server, "slow"), rcvbuf=4096)
        assert (await raw.read_event())["type"] == "connected"
        [session] = [x for x in server.hub.sessions if x.identity.user_id == "slow"]
        session.transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await raw.send_json({"type": "user_message", "text": "[[stream:60000]] flood me"})
        opened = trio.current_time()
        with trio.fail_after(10):
            while "slow" in server.hub.users:
                await trio.sleep(0.02)
        assert trio.current_time() - opened < 5
        assert server.hub.metrics.slow_consumer_closes._value.get() == 1
        assert server.hub.metrics.runs_finished.labels("cancelled", "slow_consumer")._value.get() == 1
        assert by_label(server.hub.metrics.runs_failed) == {"slow_consumer": 1}
        assert server.hub.metrics.deltas_merged._value.get() > 0  # behind: deltas merged, not piled up
        await raw.stream.aclose()


async def test_abrupt_reset_mid_stream():
    async with scenario(scripted_delay_ms=20) as server:
        raw = await open_raw(server.ws_url, token_for(server, "rst"))
        await raw.read_event()
        await raw.send_json({"type": "user_message", "text": "[[stream:100]] talk"})
        while (await raw.read_event())["type"] != "text_delta":
            pass
        raw.reset()
        with trio.fail_after(5):
            while "rst" in server.hub.users:
                await trio.sleep(0.02)
        assert server.hub.metrics.runs_finished.labels("cancelled", "disconnect")._value.get() == 1


async def test_half_open_peer_is_detected():
    async with scenario(heartbeat_interval_s=0.2, heartbeat_timeout_s=0.3) as server:
        raw = await open_raw(server.ws_url, token_for(server, "ghost"))
        await raw.read_event()
        await raw.send_json({"type": "user_message", "text": HANG})
        gone = trio.current_time()  # from now on it answers nothing, not even pings
        with trio.fail_after(5):
            while "ghost" in server.hub.users:
                await trio.sleep(0.02)
        assert trio.current_time() - gone < 0.2 + 0.3 + 1.0
        await raw.stream.aclose()


async def test_oversized_frame():
    async with scenario(max_message_bytes=1024) as server:
        raw = await open_raw(server.ws_url, token_for(server, "big"))
        await raw.read_event()
        await raw.send_frame(OP_TEXT, json.dumps({"type": "ping", "id": "x" * 2000}).encode())
        assert await raw.read_close_code() == 1009
        await raw.stream.aclose()


async def test_invalid_utf8():
    async with scenario() as server:
        raw = await open_raw(server.ws_url, token_for(server, "utf"))
        await raw.read_event()
        await raw.send_frame(OP_TEXT, b'{"type": "ping", "id": "\xff\xfe"}')
        assert await raw.read_close_code() == 1007
        await raw.stream.aclose()


async def test_malformed_json_storm():
    async with scenario(max_bad_frames=5) as server:
        async with connect(server.ws_url, token_for(server, "storm"), record=True) as conn:
            for frame in ["{not json", "[]", '{"type": 3}', '{"type": "launch"}', '{"type": "user_message"}']:
                await conn.ws.send_message(frame)
            with trio.fail_after(5):
                while len(conn.received) < 6:
                    await trio.sleep(0.01)
            codes = [r.raw["code"] for r in conn.received[1:]]
            assert codes == ["bad_request", "bad_request", "bad_request", "unknown_type", "bad_request"]
            await conn.ws.send_message("again?")
            assert (await conn.wait_closed()).code == 4400


async def test_token_expiry_mid_connection():
    async with scenario(token_expiry_grace_s=0.2, jwt_leeway_s=0) as server:
        async with connect(server.ws_url, token_for(server, "short", ttl_s=1.5)) as conn:
            run = conn.run(HANG)
            await until(run, "tool_executing")
            rest = [e async for e in run]
            assert rest[-1].type == "agent_cancelled" and rest[-1].raw["reason"] == "disconnect"
            assert (await conn.wait_closed()).code == 4401


async def test_token_refresh_keeps_the_connection():
    async with scenario(token_expiry_grace_s=0.2, jwt_leeway_s=0) as server:
        async with connect(server.ws_url, token_for(server, "renew", ttl_s=1.5), record=True) as conn:
            await conn.refresh(token_for(server, "renew", ttl_s=60))
            await trio.sleep(2.0)
            assert conn.closed is None
            assert (await conn.collect(CALC))[-1].type == "agent_completed"
            await conn.send({"type": "auth", "token": token_for(server, "someone-else"), "id": "r2"})
            await conn.ping()
            refused = [r for r in conn.received if r.raw.get("ref") == "r2"]
            assert refused and refused[0].raw["code"] == "forbidden"
            assert (await conn.collect(CALC))[-1].type == "agent_completed"  # still usable


async def test_over_limit_connections_global():
    """max_connections counts sockets from their first byte, whatever they
    speak: past it, a new connection is refused with 503 before anything else."""
    async with scenario(max_connections=3) as server:  # control holds one
        async with connect(server.ws_url, token_for(server, "x")), connect(server.ws_url, token_for(server, "y")):
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(
                    server.ws_url, extra_headers=[("Authorization", f"Bearer {token_for(server, 'z')}")]
                ) as ws:
                    await ws.get_message()
            assert refused.value.status_code == 503
            assert json.loads(refused.value.body)["code"] == "busy"
            assert server.hub.metrics.connections_dropped.labels("max_connections")._value.get() == 1
        async with connect(server.ws_url, token_for(server, "z")) as z:  # freed on close
            assert z.user_id == "z"


async def test_a_flooding_user_cannot_starve_others():
    """The flooder's backlog waits in its own user queue, not the global one."""
    async with scenario(max_runs=3, max_runs_per_user=1, max_queued_runs_per_user=16) as server:
        async with connect(server.ws_url, token_for(server, "flooder")) as flooder, \
                connect(server.ws_url, token_for(server, "patient")) as patient:
            backlog = [flooder.run('[[tool:sleep {"ms": 300}]]') for _ in range(10)]
            firsts = [await anext(run) for run in backlog]
            assert sum(e.type == "run_queued" for e in firsts) == 9
            asked = trio.current_time()
            events = await patient.collect(CALC)
            assert events[0].type == "agent_started"  # never queued behind the flooder
            assert trio.current_time() - asked < 1.0  # the backlog alone takes 3 s
            assert_run_shape(events)
            for run in backlog:
                assert [e async for e in run][-1].type == "agent_completed"


async def test_a_flooder_that_never_reads_leaves_nothing_behind():
    """A client that floods and never reads is closed 4429, and its socket,
    tasks and buffers are all let go: the server reads and drops what it
    sent until the close handshake ends or the close timeout cuts it."""
    async with scenario(rate_per_s=5, rate_burst=5, rate_abuse_limit=20) as server:
        raw = await open_raw(server.ws_url, token_for(server, "flooder"), rcvbuf=4096)
        await raw.read_event()
        with trio.move_on_after(3):
            try:
                for _ in range(5000):
                    await raw.send_frame(OP_TEXT, b'{"type": "ping"}')
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.fail_after(10):  # it never answers the close frame: cut after close_timeout_s
            while server.listener.open_connections > 1:  # the control user's own
                await trio.sleep(0.05)
        assert server.hub.metrics.connections_closed.labels("4429")._value.get() == 1
        await raw.stream.aclose()
