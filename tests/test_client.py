"""The Python client library's own promises (netra.client), through a real
server: typed events, refusals as exceptions, cancel, ping, a server close
surfacing with its code, and every failure to connect as one of the
client's own errors (never trio-websocket's or a bare OSError)."""

from __future__ import annotations

import functools

import pytest
import trio
import trio_websocket

from netra import protocol
from netra.client import (
    ClientError,
    ConnectionClosed,
    ConnectionRefused,
    ProtocolError,
    RunRefused,
    ServerUnreachable,
    connect,
)
from netra.testing import config_for_tests, open_server, token_for

CALC = 'what is [[tool:calculator {"expression": "6*7"}]]'
LONG = '[[tool:sleep {"ms": 20000}]]'


async def test_run_yields_typed_events_ending_in_a_terminal_one(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "ann")) as conn:
            events = [e async for e in conn.run(CALC)]
    expected = {
        "agent_started": protocol.AgentStarted,
        "agent_thinking": protocol.AgentThinking,
        "tool_executing": protocol.ToolExecuting,
        "tool_completed": protocol.ToolCompleted,
        "text_delta": protocol.TextDelta,
        "agent_completed": protocol.AgentCompleted,
    }
    for received in events:
        assert isinstance(received.event, expected[received.type]), received.raw
        assert received.event.run_id == events[0].event.run_id
        assert isinstance(received.seq, int) and isinstance(received.ts, int)
    assert [e.type in protocol.TERMINAL for e in events].count(True) == 1
    last = events[-1].event
    assert isinstance(last, protocol.AgentCompleted) and "42" in last.text
    tool = next(e.event for e in events if e.type == "tool_completed")
    assert tool.tool == "calculator" and tool.result == 42 and tool.duration_ms >= 0


async def test_collect_continues_a_thread(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "ann")) as conn:
            first = await conn.collect("one")
            thread_id = first[0].raw["thread_id"]
            second = await conn.collect("two", thread_id=thread_id)
    assert second[0].raw["thread_id"] == thread_id
    assert second[-1].type == "agent_completed"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        pytest.param({"agent": "no-such-agent"}, "not_found", id="unknown-agent"),
        pytest.param({"thread_id": "thr_nobody_has_this"}, "not_found", id="foreign-thread"),
    ],
)
async def test_a_refused_message_raises_run_refused(server, kwargs, code):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "ben")) as conn:
            if kwargs.get("thread_id"):  # a thread that is someone else's
                async with connect(server.ws_url, token_for(server, "other")) as theirs:
                    events = await theirs.collect("mine")
                kwargs = {"thread_id": events[0].raw["thread_id"]}
            with pytest.raises(RunRefused) as refused:
                await conn.collect("hello", **kwargs)
            assert refused.value.code == code
            assert refused.value.message and refused.value.raw["type"] == "error"
            # the connection is still usable afterwards
            assert (await conn.collect("still there?"))[-1].type == "agent_completed"


async def test_reject_strategy_refuses_with_run_in_progress(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "cat")) as conn:
            async with trio.open_nursery() as nursery:
                started: trio.Event = trio.Event()
                slot: dict[str, str] = {}

                async def long_run() -> None:
                    async for e in conn.run(LONG):
                        if e.type == "tool_executing":
                            slot["thread"], slot["run"] = e.raw["thread_id"], e.raw["run_id"]
                            started.set()
                    slot["end"] = e.raw.get("reason", e.type)

                nursery.start_soon(long_run)
                await started.wait()
                with pytest.raises(RunRefused) as refused:
                    await conn.collect("me too", thread_id=slot["thread"], multitask="reject")
                assert refused.value.code == "run_in_progress"
                assert refused.value.raw["run_id"] == slot["run"]
                await conn.cancel(run_id=slot["run"])
            assert slot["end"] == "client"


async def test_cancel_ends_the_run_with_agent_cancelled_client(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "dan")) as conn:
            events = []
            async for received in conn.run(LONG):
                events.append(received)
                if received.type == "tool_executing":
                    await conn.cancel(run_id=received.raw["run_id"])
            assert events[-1].type == "agent_cancelled"
            assert isinstance(events[-1].event, protocol.AgentCancelled)
            assert events[-1].event.reason == "client"
            done = [e for e in events if e.type == "tool_completed"]
            assert len(done) == 1 and done[0].raw.get("error")  # the call was answered, as a failure
            # and the connection carries on
            assert (await conn.collect(CALC))[-1].type == "agent_completed"


async def test_cancel_by_thread_id(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "dan")) as conn:
            async for received in conn.run(LONG):
                if received.type == "agent_started":
                    await conn.cancel(thread_id=received.raw["thread_id"])
            assert received.type == "agent_cancelled" and received.raw["reason"] == "client"


async def test_ping_returns_a_round_trip_time(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "eve"), record=True) as conn:
            rtt = await conn.ping()
            assert 0 <= rtt < 5
            assert conn.received[-1].type == "pong"
            assert isinstance(conn.received[-1].event, protocol.Pong)


async def test_server_close_surfaces_as_connection_closed_with_its_code():
    """11 malformed frames with the default max_bad_frames=10: each of the
    first ten gets an error event, the eleventh closes the connection 4400.
    A run in flight gets its terminal event before the close frame."""
    config = config_for_tests()
    assert config.max_bad_frames == 10
    async with open_server(config) as server:
        with trio.fail_after(10):
            async with connect(server.ws_url, token_for(server, "fay"), record=True) as conn:
                events = []

                async def long_run() -> None:
                    async for e in conn.run(LONG):
                        events.append(e)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(long_run)
                    while not any(e.type == "tool_executing" for e in events):
                        await trio.sleep(0.01)
                    for _ in range(11):
                        await conn.ws.send_message("this is not JSON")
                closed = await conn.wait_closed()
                assert isinstance(closed, ConnectionClosed)
                assert closed.code == 4400
                assert events[-1].type == "agent_cancelled" and events[-1].raw["reason"] == "disconnect"
                errors = [r for r in conn.received if r.type == "error"]
                assert len(errors) == 10 and {e.raw["code"] for e in errors} == {"bad_request"}


async def test_server_shutdown_cancels_the_run_then_closes_1001():
    async with open_server(config_for_tests(drain_grace_s=0.1)) as server:
        with trio.fail_after(10):
            async with connect(server.ws_url, token_for(server, "gus")) as conn:
                events = []
                async with trio.open_nursery() as nursery:

                    async def long_run() -> None:
                        async for e in conn.run(LONG):
                            events.append(e)

                    nursery.start_soon(long_run)
                    while not events:
                        await trio.sleep(0.01)
                    server.request_stop()
                assert events[-1].type == "agent_cancelled" and events[-1].raw["reason"] == "shutdown"
                closed = await conn.wait_closed()
                assert closed.code == 1001


async def test_a_run_whose_connection_ends_first_raises_connection_closed(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "gus")) as conn:
            with pytest.raises(ConnectionClosed) as closed:
                async for received in conn.run(LONG):
                    if received.type == "tool_executing":
                        await conn.ws.aclose()  # the transport goes before any terminal event
            assert closed.value.code == 1000


async def test_connect_with_a_bad_token_raises_connection_closed_4401(server):
    with trio.fail_after(10):
        with pytest.raises(ConnectionClosed) as closed:
            async with connect(server.ws_url, "not-a-jwt", auth="frame"):
                pass
        assert closed.value.code == 4401


async def test_leaving_a_run_early_keeps_the_connection_alive(server):
    """The rest of an abandoned run's events must not break the reader."""
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "hal"), record=True) as conn:
            async for received in conn.run('[[tool:sleep {"ms": 100}]]'):
                if received.type == "agent_started":
                    break
            await _until_terminal(conn)  # the rest of that run's events arrive
            await conn.ping()


async def test_a_refusal_naming_another_run_keeps_the_connection_alive(server):
    """The refusal carries the busy run's run_id; that run was sent raw, so
    no run() call owns it, and its later events must go nowhere quietly."""
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "ida"), record=True) as conn:
            await conn.send({"type": "user_message", "text": '[[tool:sleep {"ms": 300}]]', "id": "raw-1"})
            while not any(r.raw.get("thread_id") for r in conn.received):
                await trio.sleep(0.01)
            thread_id = next(r.raw["thread_id"] for r in conn.received if r.raw.get("thread_id"))
            with pytest.raises(RunRefused):
                await conn.collect("again", thread_id=thread_id, multitask="reject")
            await _until_terminal(conn)  # the first run's remaining events arrive
            await conn.ping()


async def _until_terminal(conn) -> None:
    while not any(r.type in protocol.TERMINAL for r in conn.received):
        await trio.sleep(0.01)


# -- after a close, calls raise the client's own ConnectionClosed --------------------


async def test_run_after_the_server_closed_raises_the_clients_connection_closed(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "jon")) as conn:
            for _ in range(11):
                await conn.ws.send_message("this is not JSON")
            await conn.wait_closed()
            with pytest.raises(ConnectionClosed) as closed:
                await conn.collect("hello?")
            assert closed.value.code == 4400


# -- failing to connect: the client's own errors, with the server's answer ---------


def assert_own(exc: BaseException) -> None:
    """One of the client's errors, hiding the transport's internals."""
    assert isinstance(exc, ClientError)
    assert not isinstance(exc, trio_websocket.HandshakeError | trio_websocket.ConnectionClosed | OSError)
    assert exc.__cause__ is None and exc.__suppress_context__


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        pytest.param("/ws", [], 401, "unauthorized", id="bad-header-token"),
        pytest.param("/ws", [("Origin", "https://evil.example")], 403, "forbidden", id="origin"),
        pytest.param("/ws?token=abc", [], 400, "bad_request", id="token-in-query"),
    ],
)
async def test_a_refused_upgrade_raises_connection_refused_with_the_servers_code(server, path, headers, status, code):
    token = "not-a-jwt" if status == 401 else token_for(server, "kai")
    url = server.ws_url.removesuffix("/ws") + path
    with trio.fail_after(10):
        with pytest.raises(ConnectionRefused) as refused:
            async with connect(url, token, extra_headers=headers):
                pass
    assert_own(refused.value)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert refused.value.message  # the server's explanation, e.g. "invalid token"
    assert str(refused.value).startswith(f"{status} {code}: ")


async def test_nothing_listening_raises_server_unreachable():
    with trio.socket.socket() as sock:  # a port that was free a moment ago
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    with trio.fail_after(10):
        with pytest.raises(ServerUnreachable) as unreachable:
            async with connect(url, "any"):
                pass
    assert_own(unreachable.value)
    assert unreachable.value.url == url
    assert unreachable.value.detail == "connection refused"


async def test_a_server_that_never_answers_raises_server_unreachable_after_the_timeout():
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10):
            with pytest.raises(ServerUnreachable) as unreachable:
                async with connect(f"ws://127.0.0.1:{port}/ws", "any", connect_timeout=0.3):
                    pass
        nursery.cancel_scope.cancel()
    assert_own(unreachable.value)
    assert unreachable.value.detail == "no answer within 0.3 s"


@pytest.mark.parametrize(
    ("first_frame", "expected"),
    [
        pytest.param("this is not JSON", "not a protocol v1 event", id="not-json"),
        pytest.param('["connected"]', "not a protocol v1 event", id="not-an-object"),
        pytest.param('{"type": "pong", "seq": 1, "ts": 0, "id": "x"}', "expected 'connected'", id="not-connected"),
    ],
)
async def test_a_server_that_is_not_netra_raises_protocol_error(first_frame, expected):
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(first_frame)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(functools.partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=None))
        with trio.fail_after(10):
            with pytest.raises(ProtocolError, match=expected) as wrong:
                async with connect(f"ws://127.0.0.1:{ws_server.port}/ws", "any"):
                    pass
        nursery.cancel_scope.cancel()
    assert_own(wrong.value)


async def test_a_bad_frame_token_raises_connection_closed_with_the_close_reason(server):
    with trio.fail_after(10):
        with pytest.raises(ConnectionClosed) as closed:
            async with connect(server.ws_url, token_for(server, "lou", ttl_s=-120), auth="frame"):
                pass
    assert_own(closed.value)
    assert closed.value.code == 4401 and closed.value.reason == "token expired"


async def test_errors_inside_the_block_are_the_callers_own(server):
    """Only the handshake is translated: an OSError or a timeout of the
    caller's own code inside the block reaches the caller unchanged."""
    with trio.fail_after(10):
        with pytest.raises(FileNotFoundError):
            async with connect(server.ws_url, token_for(server, "max")):
                open("/nonexistent/netra/file")  # noqa: SIM115
        with pytest.raises(trio.TooSlowError):
            async with connect(server.ws_url, token_for(server, "max")):
                with trio.fail_after(0.01):
                    await trio.sleep_forever()


def test_every_client_error_is_exported():
    import netra.client
    from netra.client import _errors

    family = {name for name, value in vars(_errors).items() if isinstance(value, type) and issubclass(value, ClientError)}
    assert family == {"ClientError", "ServerUnreachable", "ConnectionRefused", "ConnectionClosed", "RunRefused",
                      "DecisionRefused", "ProtocolError"}
    assert all(getattr(netra.client, name) is getattr(_errors, name) for name in family)
