"""The official MCP SDK runs under trio: its stdio and streamable-HTTP
clients, against a real server process, cancellation included.

netra builds on these facts (see netra/mcp/client.py); if an SDK upgrade
breaks one, it shows here first, not as a hung run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from tests.mcp_server import http_server, stdio_command


@asynccontextmanager
async def _server(transport: str) -> AsyncIterator[object]:
    if transport == "stdio":
        command = stdio_command()
        yield StdioServerParameters(command=command[0], args=command[1:])
    else:
        async with http_server() as (url, _process):
            yield url


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_sdk_client_lists_calls_and_is_cancelled_under_trio(transport):
    with trio.fail_after(60):
        async with _server(transport) as target, Client(target, cache=None) as client:
            listed = await client.list_tools()
            assert {"add", "hang", "lookup.city"} <= {t.name for t in listed.tools}

            result = await client.call_tool("add", {"a": 2, "b": 3})
            assert result.structured_content == {"result": 5} and not result.is_error

            failed = await client.call_tool("fail", {"message": "boom"})
            assert failed.is_error and "boom" in failed.content[0].text

            # a trio cancel scope cuts a call short, and the session goes on
            with trio.move_on_after(0.5) as scope:
                await client.call_tool("hang", {"seconds": 600})
            assert scope.cancelled_caught
            again = await client.call_tool("add", {"a": 1, "b": 1})
            assert again.structured_content == {"result": 2}

            # calls from other tasks than the one that opened the client
            answers: list[object] = []

            async def call(n: int) -> None:
                answers.append((await client.call_tool("add", {"a": n, "b": n})).structured_content["result"])

            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(call, n)
            assert sorted(answers) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_server_killed_mid_call_fails_the_call_made_from_another_task(transport):
    """The calling task gets MCPError at once. The task that holds the client
    sees the session end: quietly over stdio; over HTTP its exit raises the
    transport's error, in a group that may also hold a trio.Cancelled from the
    transport's task group (netra's edge splits the error out of it)."""
    with trio.fail_after(60):
        async with _server(transport) as target:
            ready, finished = trio.Event(), trio.Event()
            holder: dict[str, object] = {}

            async def hold() -> None:
                try:
                    async with Client(target, cache=None) as client:
                        holder["client"] = client
                        ready.set()
                        await finished.wait()
                except BaseException as exc:  # noqa: BLE001 - recorded, checked below
                    holder["ended"] = exc
                finally:
                    ready.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await ready.wait()
                client = holder["client"]
                pid = (await client.call_tool("pid", {})).structured_content["result"]

                async def kill_soon() -> None:
                    await trio.sleep(0.5)
                    os.kill(pid, signal.SIGKILL)

                nursery.start_soon(kill_soon)
                with pytest.raises(MCPError, match="Connection closed"):
                    await client.call_tool("hang", {"seconds": 600})
                with pytest.raises(MCPError, match="Connection closed"):
                    await client.call_tool("add", {"a": 1, "b": 1})
                finished.set()
            ended = holder.get("ended")
            if transport == "stdio":
                assert ended is None
            else:
                assert isinstance(ended, BaseExceptionGroup) and ended.split(Exception)[0] is not None
