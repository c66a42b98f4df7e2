"""Tools from real MCP servers (tests/mcp_server.py, a subprocess), over
stdio and over streamable HTTP, called by real runs: listing, a call, a tool
error, arguments checked before the call, a result cut to size, a hang past
the timeout, a run cancelled mid-call, the server killed mid-call and
reconnected for a later call, servers that are down at start-up, headers,
and one run over a WebSocket with the client library."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from netra.agents import Agent, AgentSet, builtin_agents
from netra.client import connect
from netra.hub import Hub
from netra.logs import JsonFormatter
from netra.testing import MemoryConnection, config_for_tests, open_hub, open_server, token_for
from tests.mcp_server import http_server, stdio_command

TRANSPORTS = ["stdio", "http"]


@asynccontextmanager
async def mcp_entry(transport: str, **extra: Any) -> AsyncIterator[dict[str, Any]]:
    """The test server, as an mcp_servers entry, for the block."""
    if transport == "stdio":
        yield {"command": stdio_command(), **extra}
    else:
        async with http_server() as (url, _process):
            yield {"url": url, **extra}


def completed(events: list[dict[str, Any]]) -> dict[str, Any]:
    (event,) = [e for e in events if e["type"] == "tool_completed"]
    return event


async def call(conn: MemoryConnection, tool: str, args: str = "{}") -> dict[str, Any]:
    """Run one message that calls ``tool``: its tool_completed event."""
    events = await conn.run(f"[[tool:{tool} {args}]]")
    assert events[-1]["type"] == "agent_completed", events[-1]
    return completed(events)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_runs_call_the_tools_of_an_mcp_server(transport, monkeypatch):
    monkeypatch.setenv("NETRA_MCP_TEST_SECRET", "netra's own")  # not for a stdio server's eyes
    with trio.fail_after(90):
        async with (
            mcp_entry(transport, timeout_s=2, env={"NETRA_MCP_TEST": "from netra"} if transport == "stdio" else {}) as entry,
            open_hub(config_for_tests(mcp_servers={"test": entry}, max_tool_result_bytes=2000)) as served,
        ):
            hub = served.hub
            specs = {s.name: s for s in hub.agent_specs["assistant"]}
            assert {"test__add", "test__hang", "test__lookup_city", "calculator"} <= set(specs)
            assert specs["test__add"].parameters["required"] == ["a", "b"]
            assert hub.mcp.states() == {"test": {"state": "ready", "tools": 13}}
            assert all("test__add" in {s.name for s in specs} for specs in hub.agent_specs.values())

            async with served.connect(user_id="alice") as conn:
                events = await conn.run('what is [[tool:test__add {"a": 2, "b": 3}]]')
                executing = next(e for e in events if e["type"] == "tool_executing")
                assert (executing["tool"], executing["args"]) == ("test.add", {"a": 2, "b": 3})
                done = completed(events)
                assert (done["tool"], done["result"], done.get("error")) == ("test.add", {"result": 5}, None)

                done = await call(conn, "test__lookup_city", '{"city": "Paris"}')
                assert (done["tool"], done["result"]) == ("test.lookup.city", {"result": "Paris: found"})

                done = await call(conn, "test__fail", '{"message": "boom"}')
                assert done.get("result") is None and "boom" in done.get("error")

                done = await call(conn, "test__pick", '{"count": 9, "colour": "purple"}')
                assert done.get("error") == (
                    'argument \'colour\' must be one of "red", "green", "blue", got "purple"; '
                    "argument 'count': 9 is greater than the maximum of 5"
                )
                done = await call(conn, "test__pick", '{"count": 2, "colour": "red"}')
                assert done["result"] == {"count": 2, "colour": "red", "note": ""}

                done = await call(conn, "test__big", '{"size": 100000}')
                assert done["result"]["truncated"] is True and done["result"]["bytes"] > 100000

                if transport == "stdio":
                    done = await call(conn, "test__environment", '{"name": "NETRA_MCP_TEST"}')
                    assert done["result"] == {"result": "from netra"}
                    done = await call(conn, "test__environment", '{"name": "NETRA_MCP_TEST_SECRET"}')
                    assert done["result"] == {"result": "<unset>"}

                # past the server's timeout_s (2 s): a failed call, and the session goes on
                done = await call(conn, "test__hang", '{"seconds": 600}')
                assert done.get("error") == "test__hang timed out" and 1900 <= done["duration_ms"] < 10000
                assert (await call(conn, "test__add", '{"a": 1, "b": 1}'))["result"] == {"result": 2}

                # a run cancelled while its MCP call runs
                await conn.send({"type": "user_message", "text": "[[tool:test__hang {}]]"})
                started = await conn.until("tool_executing")
                await conn.send({"type": "cancel", "run_id": started["run_id"]})
                assert (await conn.until("tool_completed"))["error"] == "cancelled"
                await conn.until("agent_cancelled")
                assert (await call(conn, "test__add", '{"a": 2, "b": 2}'))["result"] == {"result": 4}
            assert hub.mcp.connections[0].sessions == 1
            assert await hub.mcp.problems() == []


async def _run_until_killed(conn: MemoryConnection, pid: int) -> list[dict[str, Any]]:
    """Start a run that calls hang, kill the server once the call runs, and
    return the run's events."""
    await conn.send({"type": "user_message", "text": "[[tool:test__hang {}]]"})
    events = [await conn.until("tool_executing")]
    await trio.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    while events[-1]["type"] not in ("agent_completed", "agent_error", "agent_cancelled"):
        events.append(await conn.receive())
    return events


async def test_a_stdio_server_killed_mid_call_fails_that_call_and_is_restarted_for_the_next():
    with trio.fail_after(90):
        config = config_for_tests(mcp_servers={"test": {"command": stdio_command()}})
        async with open_hub(config) as served, served.connect(user_id="alice") as conn:
            pid = (await call(conn, "test__pid"))["result"]["result"]
            events = await _run_until_killed(conn, pid)
            error = completed(events)["error"]
            assert error.startswith("MCP server 'test' went away during the call") and "reconnecting" in error
            assert events[-1]["type"] == "agent_completed"  # the model saw a failed tool, the run went on
            # a later call starts the server again
            done = await call(conn, "test__pid")
            assert done.get("error") is None and done["result"]["result"] != pid
            assert served.hub.mcp.connections[0].sessions == 2


async def test_an_http_server_killed_mid_call_is_not_ready_until_it_is_back():
    with trio.fail_after(90):
        async with http_server() as (url, process):
            port = int(url.split(":")[2].split("/")[0])
            config = config_for_tests(mcp_servers={"test": {"url": url}})
            async with open_hub(config) as served, served.connect(user_id="alice") as conn:
                events = await _run_until_killed(conn, process.pid)
                assert "went away during the call" in completed(events)["error"]
                (problem,) = await served.hub.mcp.problems()
                assert problem.startswith("mcp server test: ")
                done = await call(conn, "test__add", '{"a": 1, "b": 2}')
                assert "is unavailable" in done.get("error")
                async with http_server(port=port):
                    await trio.sleep(1.1)  # the failed attempt is a second old: a call may ask again
                    done = await call(conn, "test__add", '{"a": 1, "b": 2}')
                    assert (done.get("error"), done["result"]) == (None, {"result": 3})
                    assert await served.hub.mcp.problems() == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_servers_that_are_down_at_start_up_make_netra_not_ready_not_broken():
    servers = {
        "gone": {"command": ["/nonexistent/mcp-server", "--stdio"], "connect_timeout_s": 10},
        "closed": {"url": f"http://127.0.0.1:{_closed_port()}/mcp", "connect_timeout_s": 10},
        "locked": None,  # filled in below: a server that wants a token it is not given
    }
    with trio.fail_after(90):
        async with http_server(token="t0ken") as (url, _process):
            servers["locked"] = {"url": url, "connect_timeout_s": 10}
            config = config_for_tests(mcp_servers=servers)
            async with (
                open_server(config) as server,
                httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
            ):
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                problems = ready.json()["problems"]
                assert problems[0].startswith("mcp server gone: cannot start the command: No such file")
                assert problems[1].startswith("mcp server closed: HTTP failed while connecting: ConnectError")
                assert problems[2].startswith("mcp server locked: ")
                assert ready.json()["mcp"]["gone"] == {"state": "down", "tools": 0}
                assert (await http.get("/healthz")).status_code == 200
                async with connect(server.ws_url, token_for(server, "bea")) as conn:
                    text = '[[tool:gone__anything {}]] and [[tool:calculator {"expression": "1+1"}]]'
                    events = [e async for e in conn.run(text)]
                assert events[-1].type == "agent_completed"
                results = [e.raw for e in events if e.type == "tool_completed"]
                assert "unknown tool" in results[0]["error"] and results[1].get("error") is None


async def test_headers_reach_an_http_server():
    with trio.fail_after(90):
        async with http_server(token="t0ken") as (url, _process):
            entry = {"url": url, "headers": {"Authorization": "Bearer t0ken"}}
            async with open_hub(config_for_tests(mcp_servers={"test": entry})) as served:
                async with served.connect(user_id="alice") as conn:
                    assert (await call(conn, "test__add", '{"a": 4, "b": 5}'))["result"] == {"result": 9}


async def test_a_websocket_run_calls_an_mcp_tool_end_to_end():
    """A custom agent set: one agent names a single MCP tool, the server
    gives all its tools only to another."""
    clerk = Agent(name="clerk", description="Adds up.", instructions="Add.", tools=("test.add", "calculator"))
    agents = AgentSet.of([clerk, builtin_agents()["assistant"]])
    entry = {"command": stdio_command(), "agents": ["assistant"], "concurrency": 2}
    with trio.fail_after(90):
        async with open_server(config_for_tests(mcp_servers={"test": entry}), agents=agents) as server:
            hub = server.hub
            def mcp_tools(agent: str) -> list[str]:
                return [s.name for s in hub.agent_specs[agent] if s.name.startswith("test__")]

            assert mcp_tools("clerk") == ["test__add"] and "calculator" in {s.name for s in hub.agent_specs["clerk"]}
            assert len(mcp_tools("assistant")) == 13
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                ready = await http.get("/readyz")
                assert ready.status_code == 200 and ready.json()["mcp"] == {"test": {"state": "ready", "tools": 13}}
                assert 'netra_limiter_borrowed{limiter="mcp:test"} 0.0' in (await http.get("/metrics")).text
            async with connect(server.ws_url, token_for(server, "ann")) as conn:
                events = [e async for e in conn.run('add [[tool:test__add {"a": 20, "b": 22}]]', agent="clerk")]
            types = [e.type for e in events]
            assert types[0] == "agent_started" and types[-1] == "agent_completed"
            assert types.index("tool_executing") < types.index("tool_completed")
            executing, done = (next(e.raw for e in events if e.type == t) for t in ("tool_executing", "tool_completed"))
            assert executing["tool"] == done["tool"] == "test.add"
            assert done["result"] == {"result": 42} and done.get("error") is None
            assert "42" in "".join(e.raw.get("delta", "") for e in events if e.type == "text_delta")


def test_a_server_given_to_an_agent_that_does_not_exist_is_refused_at_build():
    config = config_for_tests(mcp_servers={"test": {"command": "srv", "agents": ["assistant", "asistant"]}})
    with pytest.raises(ValueError, match=r"mcp_servers\.test\.agents: no agent named asistant"):
        Hub.build(config)


async def test_a_stdio_server_stderr_becomes_netra_log_lines(caplog):
    command = ["python3", "-c", "import sys; print('first words', file=sys.stderr); print('last', file=sys.stderr)"]
    config = config_for_tests(mcp_servers={"noisy": {"command": command, "connect_timeout_s": 20}})
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="netra.mcp"):
        async with open_hub(config) as served:
            assert served.hub.mcp.connections[0].state == "down"  # it exited: no MCP here
    lines = [r for r in caplog.records if getattr(r, "mcp_server", None) == "noisy"]
    assert [r.getMessage() for r in lines][:2] == ["first words", "last"]
    assert '"mcp_server": "noisy"' in JsonFormatter().format(lines[0])
