"""A real MCP server for netra's tests, written with the ``mcp`` package.

Run it as ``python tests/mcp_server.py stdio`` (the protocol on stdin and
stdout) or ``python tests/mcp_server.py http [--port N] [--token T]``
(streamable HTTP on loopback, a free port unless given: the first line on
stdout is ``PORT <n>``, and with ``--token`` every request needs
``Authorization: Bearer T``). It runs under asyncio in its own process, as
any MCP server netra talks to would; :func:`stdio_command` and
:func:`http_server` start it for the tests.

Its tools cover what netra must handle: a plain result, a tool error, a call
that hangs, a server that dies mid-call, a large result, constraints a
JSON schema states but netra's own validator does not know, a name with a
dot, the environment netra gave the process, and the MCP annotations a
tool's approval may follow (``peek`` read-only, ``erase`` destructive,
``append`` additive; the others say nothing).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field  # at the top: the tools' annotations are resolved here


def build() -> Any:
    """The server and its tools (built on demand: constructing an MCPServer
    configures the root logger, which a test process that only imports the
    helpers below must not get)."""
    import anyio
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    server = MCPServer("netra-test")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two whole numbers."""
        return a + b

    @server.tool()
    def echo(text: str, times: int = 1) -> str:
        """Repeat a text."""
        return text * times

    @server.tool()
    def fail(message: str) -> str:
        """Always fails, with the message given."""
        raise ToolError(message)

    @server.tool()
    async def hang(seconds: float = 3600.0) -> str:
        """Sleep, then answer (hangs past any sensible timeout by default)."""
        await anyio.sleep(seconds)
        return "woke up"

    @server.tool()
    def pid() -> int:
        """The server's process id (so a test can kill it)."""
        return os.getpid()

    @server.tool()
    def crash() -> str:
        """The server process exits in the middle of the call."""
        os._exit(3)

    @server.tool()
    def big(size: int) -> str:
        """A result of ``size`` characters."""
        return "x" * size

    @server.tool()
    def pick(
        count: Annotated[int, Field(ge=1, le=5, description="How many, 1 to 5.")],
        colour: Literal["red", "green", "blue"],
        note: Annotated[str, Field(max_length=10)] = "",
    ) -> dict[str, object]:
        """Choose a number of things of a colour (a schema with constraints)."""
        return {"count": count, "colour": colour, "note": note}

    @server.tool(name="lookup.city")
    def lookup_city(city: str) -> str:
        """Look a city up (a tool name with a dot in it)."""
        return f"{city}: found"

    @server.tool()
    def environment(name: str) -> str:
        """The value of one environment variable of the server process."""
        return os.environ.get(name, "<unset>")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def peek(key: str) -> str:
        """Read a value (annotated read-only)."""
        return f"{key}: 42"

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    def erase(key: str) -> str:
        """Delete a value (annotated destructive)."""
        return f"{key}: erased"

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False))
    def append(text: str) -> str:
        """Add a line (annotated as writing, but only adding)."""
        return f"appended: {text}"

    return server


def _serve_http(server: Any, token: str | None, port: int) -> None:
    import anyio
    import uvicorn
    from starlette.responses import JSONResponse

    app = server.streamable_http_app()

    async def guarded(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http" and token is not None:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != f"Bearer {token}".encode():
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await app(scope, receive, send)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)  # before PORT is printed: a client may connect at once
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(guarded, log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve, [sock])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--token")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    server = build()
    if options.transport == "stdio":
        server.run("stdio")
    else:
        _serve_http(server, options.token, options.port)


# -- for the tests that start it ------------------------------------------------


def stdio_command() -> list[str]:
    """The command that runs this server over stdio."""
    return [sys.executable, str(Path(__file__).resolve()), "stdio"]


@asynccontextmanager
async def http_server(*, port: int = 0, token: str | None = None) -> AsyncIterator[tuple[str, Any]]:
    """This server over streamable HTTP, for the block: (its URL, its process)."""
    import trio

    args = [sys.executable, str(Path(__file__).resolve()), "http", "--port", str(port)]
    if token is not None:
        args += ["--token", token]
    process = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
    try:
        head = b""
        with trio.fail_after(60):
            while b"\n" not in head:
                chunk = await process.stdout.receive_some(1024)
                if not chunk:
                    raise RuntimeError("the test MCP server exited before it listened")
                head += chunk
        yield f"http://127.0.0.1:{int(head.split()[1])}/mcp", process
    finally:
        process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
            await process.stdout.aclose()


if __name__ == "__main__":
    sys.exit(main())
