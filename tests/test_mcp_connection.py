"""One MCP server's connection, its timing logic under the autojump clock:
attempts and their back-off, a call that finds the server down, a session
that breaks mid-call (the call fails, never retried, and the connection is
reopened), readiness checks, the connect timeout and the concurrency cap.
The sessions are fakes; tests/test_mcp.py runs the same against real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from netra.errors import ToolError
from netra.mcp.config import McpServerConfig
from netra.mcp.connection import McpConnection
from netra.mcp.errors import McpUnavailable
from netra.mcp.tools import ToolInfo

ADD = ToolInfo("add", "Add.", {"type": "object"})


@attrs.define(eq=False)
class FakeServer:
    """A server the test switches on and off; its sessions obey ``behaviour``."""

    up: bool = True
    connect_hangs: bool = False
    listing: tuple[ToolInfo, ...] = (ADD,)
    #: What the next calls do: "ok", "error", "die", "hang".
    behaviour: str = "ok"
    opened: int = 0
    calls: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    session: Any = None
    #: Each listing the connection reported.
    listings: list[tuple[ToolInfo, ...]] = attrs.Factory(list)

    @asynccontextmanager
    async def open(self, config: McpServerConfig) -> AsyncIterator[FakeSession]:
        await trio.sleep(0.1)  # starting a process, a handshake
        if self.connect_hangs:
            await trio.sleep_forever()
        if not self.up:
            raise McpUnavailable("cannot start the command: No such file or directory: srv")
        self.opened += 1
        self.session = FakeSession(self)
        yield self.session


@attrs.define(eq=False)
class FakeSession:
    server: FakeServer
    broken: bool = False

    async def list_tools(self) -> tuple[ToolInfo, ...]:
        await trio.sleep(0.01)
        if self.broken:
            raise McpUnavailable("the connection closed while listing tools")
        if self.server.behaviour == "hang":
            await trio.sleep_forever()
        return self.server.listing

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        server = self.server
        server.calls += 1
        server.in_flight += 1
        server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            await trio.sleep(0.5)
            if self.broken:
                raise McpUnavailable("the connection closed while calling a tool")
            match server.behaviour:
                case "error":
                    raise ToolError("the tool failed")
                case "die":
                    self.broken = True
                    server.up = False
                    raise McpUnavailable("the connection closed while calling a tool")
                case "hang":
                    await trio.sleep_forever()
            return {"tool": name, **arguments}
        finally:
            server.in_flight -= 1


@asynccontextmanager
async def running(server: FakeServer, **config: Any) -> AsyncIterator[McpConnection]:
    connection = McpConnection(
        McpServerConfig(name="srv", command=("srv",), **config), server.open,
        lambda c: server.listings.append(c.listing),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await connection.first_settled.wait()
        yield connection
        nursery.cancel_scope.cancel()


async def test_a_server_that_is_up_is_listed_and_called(autojump_clock):
    server = FakeServer()
    async with running(server) as connection:
        assert (connection.state, connection.listing, server.listings) == ("ready", (ADD,), [(ADD,)])
        assert await connection.call("add", {"a": 1}) == {"tool": "add", "a": 1}
        server.behaviour = "error"
        with pytest.raises(ToolError, match="the tool failed") as caught:
            await connection.call("add", {})
        assert not isinstance(caught.value, McpUnavailable) and connection.state == "ready"
        assert await connection.check(2) is None


async def test_attempts_back_off_while_the_server_stays_down(autojump_clock):
    server = FakeServer(up=False)
    async with running(server) as connection:
        assert connection.state == "down" and "No such file" in connection.problem
        start = trio.current_time()
        seen = []
        while connection.attempts < 7:
            await trio.sleep(0.05)
            if connection.attempts > len(seen) + 1:
                seen.append(round(trio.current_time() - start, 1))
        # again after 1, 2, 4, 8, 16, 30 s (each attempt takes 0.1 s)
        assert seen == [1.0, 3.1, 7.2, 15.3, 31.4, 61.5]
        await trio.sleep(100)
        assert connection.attempts == 7 + 3  # at most 30 s apart
        assert await connection.check(2) == connection.problem


async def test_a_call_on_a_down_server_asks_for_an_attempt_and_waits_for_it(autojump_clock):
    server = FakeServer(up=False)
    async with running(server) as connection:
        await trio.sleep(5)  # two quick attempts failed; the next is due later
        attempts = connection.attempts
        server.up = True
        assert await connection.call("add", {}) == {"tool": "add"}
        assert connection.attempts == attempts + 1 and connection.state == "ready"
        # the server dies with a call: that call fails; the next asks for an attempt
        server.behaviour = "die"
        with pytest.raises(McpUnavailable, match="went away during the call"):
            await connection.call("add", {})
        attempts = connection.attempts
        with pytest.raises(McpUnavailable, match="is unavailable: cannot start the command"):
            await connection.call("add", {})
        assert connection.attempts == attempts + 1 and connection.state == "down"
        # one that comes within a second of a failed attempt fails at once
        before = trio.current_time()
        with pytest.raises(McpUnavailable, match="is unavailable"):
            await connection.call("add", {})
        assert trio.current_time() == before and connection.attempts == attempts + 1
        # later, a call asks again, and fails after that one attempt
        await trio.sleep(1.5)
        attempts = connection.attempts
        with pytest.raises(McpUnavailable, match="is unavailable"):
            await connection.call("add", {})
        assert connection.attempts == attempts + 1


async def test_a_session_that_breaks_mid_call_fails_that_call_once_and_is_reopened(autojump_clock):
    server = FakeServer()
    async with running(server) as connection:
        server.behaviour = "die"
        with pytest.raises(McpUnavailable, match="went away during the call .*netra is reconnecting"):
            await connection.call("add", {})
        assert server.calls == 1  # never retried: the tool may have acted
        server.up, server.behaviour = True, "ok"
        server.listing = (ADD, ToolInfo("sub", "Subtract.", {"type": "object"}))
        assert await connection.call("add", {"b": 2}) == {"tool": "add", "b": 2}
        assert server.opened == 2 and connection.sessions == 2
        assert server.listings[-1] == server.listing


async def test_a_check_notices_a_broken_session_and_a_silent_one(autojump_clock):
    server = FakeServer()
    async with running(server) as connection:
        server.session.broken = True  # a stdio server that died while idle
        assert await connection.check(2) == "the connection closed while listing tools"
        await trio.sleep(1.5)  # a short session: the next attempt comes after 1 s
        assert connection.state == "ready" and server.opened == 2
        server.behaviour = "hang"
        assert await connection.check(2) == "no answer within 2s"
        assert connection.state == "ready"  # slow is not gone


async def test_a_server_that_never_answers_is_down_after_the_connect_timeout(autojump_clock):
    server = FakeServer(connect_hangs=True)
    async with running(server, connect_timeout_s=5) as connection:
        assert trio.current_time() == pytest.approx(5)
        assert connection.state == "down"
        assert connection.problem == "no answer within 5s (connect_timeout_s)"


async def test_concurrency_caps_calls_to_the_server(autojump_clock):
    server = FakeServer()
    async with running(server, concurrency=2) as connection:
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(connection.call, "add", {"n": n})
        assert server.calls == 6 and server.most_in_flight == 2


async def test_a_cancelled_call_leaves_the_session_alone(autojump_clock):
    server = FakeServer()
    async with running(server) as connection:
        server.behaviour = "hang"
        with trio.move_on_after(3):
            await connection.call("add", {})
        server.behaviour = "ok"
        assert await connection.call("add", {}) == {"tool": "add"}
        assert server.opened == 1
