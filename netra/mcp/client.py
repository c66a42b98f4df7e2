"""The edge between netra and the MCP SDK: the one module that imports it.

:func:`open_session` starts (stdio) or reaches (streamable HTTP) one MCP
server with the SDK's ``Client`` and yields an :class:`SdkSession`, which
speaks netra's terms: tool listings are :class:`ToolInfo`, results are JSON
values, and every exception the SDK, httpx2, anyio or the OS raises becomes
a :class:`McpUnavailable` (the connection is gone or cannot be made) or a
:class:`~netra.errors.ToolError` (this call failed, the connection is fine)
in :func:`_reraise`, and nowhere else.

The SDK is built on anyio and runs under trio as it is, stdio and HTTP
alike, cancellation included. One thing needs care: when a streamable-HTTP
server drops a request mid-way, the SDK's transport task group fails, and
``Client``'s exit raises an exception group that holds the transport error
and may also hold a ``trio.Cancelled`` from that task group. So failures are told apart
from cancellation by splitting the group (:func:`_failure`), never with
``except Exception``; and a Cancelled swallowed that way is harmless, since
trio's cancellation is level-triggered and fires again at the next
checkpoint when it was ours.

Importing the SDK costs more than a second, so netra imports this module only
when MCP servers are configured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any, NoReturn

import anyio
import attrs
import httpx2
import mcp_types
import pydantic
import trio
from mcp import Client, MCPError, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from .. import __version__
from ..errors import ToolError
from .config import McpServerConfig
from .errors import McpUnavailable
from .tools import ToolHints, ToolInfo

log = logging.getLogger("netra.mcp")

#: Pages of a tool listing read at most (a server that paginates forever cannot hang start-up).
_MAX_PAGES = 100
_MAX_STDERR_LINE = 2000
#: An HTTP read's limit, the SDK's default: a server may hold a stream open
#: (netra's call timeouts bound the calls themselves).
_HTTP_READ_TIMEOUT_S = 300.0
#: How long a closing session waits for the server's last stderr lines.
_STDERR_DRAIN_S = 1.0


@attrs.define(eq=False)
class SdkSession:
    """One live MCP session; its methods may be called from any task."""

    client: Client

    async def list_tools(self) -> tuple[ToolInfo, ...]:
        infos: list[ToolInfo] = []
        cursor: str | None = None
        with _translated("listing tools"):
            for _ in range(_MAX_PAGES):
                page = await self.client.list_tools(cursor=cursor)
                infos.extend(
                    ToolInfo(name=t.name, description=t.description or t.title or "",
                             input_schema=dict(t.input_schema), hints=_hints(t.annotations))
                    for t in page.tools
                )  # fmt: skip
                cursor = page.next_cursor
                if cursor is None:
                    break
        return tuple(infos)

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """The tool's result as a JSON value; ToolError when the tool reports
        an error, McpUnavailable when the connection breaks."""
        with _translated("calling a tool"):
            result = await self.client.call_tool(name, arguments)
        if result.is_error:
            raise ToolError(_text(result.content) or f"{name} failed (the server gave no reason)")
        if result.structured_content is not None:
            return result.structured_content
        return _content(result.content)


@asynccontextmanager
async def open_session(config: McpServerConfig) -> AsyncIterator[SdkSession]:
    """A session with the server ``config`` names, for as long as the block
    runs. Raises McpUnavailable when the server cannot be started or
    reached, and when the session ends with a failure."""
    up = False
    try:
        async with AsyncExitStack() as stack:
            if config.url is not None:
                timeout = httpx2.Timeout(30.0, connect=config.connect_timeout_s, read=_HTTP_READ_TIMEOUT_S)
                http = httpx2.AsyncClient(headers=dict(config.headers), timeout=timeout)
                await stack.enter_async_context(http)
                target: Any = streamable_http_client(config.url, http_client=http)
                errlog = None
            else:
                errlog = await _stderr_to_log(config, stack)
                command = StdioServerParameters(
                    command=config.command[0], args=list(config.command[1:]),
                    env=dict(config.env) or None, cwd=config.cwd,
                )  # fmt: skip
                target = stdio_client(command, errlog=errlog)
            client = Client(target, cache=None, client_info=mcp_types.Implementation(name="netra", version=__version__))
            await stack.enter_async_context(client)
            if errlog is not None:
                # the server has its own copy: with netra's closed, the log
                # reader sees EOF once the server is gone
                errlog.close()
            up = True
            yield SdkSession(client)
    except BaseException as exc:
        _reraise(exc, "the session ran" if up else "connecting")


async def _stderr_to_log(config: McpServerConfig, stack: AsyncExitStack) -> Any:
    """A pipe for the server's stderr whose lines go to netra's log (one JSON
    line each, with ``mcp_server``), so a chatty server cannot break the log
    format. When the session closes, the reader gets a moment to log what
    the server wrote last (why it failed, often)."""
    read_fd, write_fd = os.pipe()
    errlog = os.fdopen(write_fd, "w")
    stack.callback(errlog.close)
    stream = trio.lowlevel.FdStream(read_fd)
    finished = trio.Event()

    async def read() -> None:
        buffer = b""
        try:
            while chunk := await stream.receive_some(65536):
                *lines, buffer = (buffer + chunk).split(b"\n")
                buffer = buffer[-_MAX_STDERR_LINE:]
                for line in lines:
                    if line.strip():
                        text = line[:_MAX_STDERR_LINE].decode("utf-8", "replace").rstrip()
                        log.info("%s", text, extra={"mcp_server": config.name})
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            stream.close()
            finished.set()

    nursery = await stack.enter_async_context(trio.open_nursery())

    async def finish() -> None:
        errlog.close()  # EOF, once the server (and anything it started) is gone
        try:
            with trio.move_on_after(_STDERR_DRAIN_S):
                await finished.wait()
        finally:
            nursery.cancel_scope.cancel()

    stack.push_async_callback(finish)
    nursery.start_soon(read)
    return errlog


@contextmanager
def _translated(doing: str) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        _reraise(exc, doing)


def _reraise(exc: BaseException, doing: str) -> NoReturn:
    """Library exceptions become netra's, here and only here; cancellation
    (and netra's own errors) pass through as they are."""
    failure = _failure(exc)
    if failure is None or isinstance(failure, ToolError):
        raise exc
    raise _translate(failure, doing) from failure


def _failure(exc: BaseException) -> BaseException | None:
    """The failure in ``exc``: itself, or the first one in a group that is not
    a cancellation; None when it is only cancellation (or an interrupt)."""
    if isinstance(exc, BaseExceptionGroup):
        failures, _ = exc.split(Exception)
        while isinstance(failures, BaseExceptionGroup):
            failures = failures.exceptions[0]
        return failures
    return exc if isinstance(exc, Exception) else None


def _translate(exc: BaseException, doing: str) -> Exception:
    match exc:
        case MCPError(code=mcp_types.CONNECTION_CLOSED):
            return McpUnavailable(f"the connection closed while {doing}")
        case MCPError() if doing == "calling a tool":
            return ToolError(f"the server refused the call: {exc.message}")
        case MCPError():
            return McpUnavailable(f"the server answered an error while {doing}: {exc.message}")
        case pydantic.ValidationError() if doing == "calling a tool":
            return ToolError(f"the server's answer is not valid MCP: {_short(exc)}")
        case FileNotFoundError() | PermissionError():
            return McpUnavailable(f"cannot start the command: {exc.strerror}: {exc.filename or ''}".rstrip(": "))
        case httpx2.HTTPError():
            return McpUnavailable(f"HTTP failed while {doing}: {type(exc).__name__}: {_short(exc)}")
        case OSError() | anyio.BrokenResourceError() | anyio.ClosedResourceError() | anyio.EndOfStream():
            return McpUnavailable(f"the connection failed while {doing}: {type(exc).__name__}: {_short(exc)}")
        case _:
            log.warning("MCP client failed while %s", doing, exc_info=exc)
            return McpUnavailable(f"{type(exc).__name__} while {doing}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:300]


def _hints(annotations: mcp_types.ToolAnnotations | None) -> ToolHints:
    """The annotations approval may follow (the SDK has checked they are booleans)."""
    if annotations is None:
        return ToolHints()
    return ToolHints(read_only=annotations.read_only_hint, destructive=annotations.destructive_hint)


def _text(content: list[Any]) -> str:
    return "\n".join(block.text for block in content if isinstance(block, mcp_types.TextContent))


def _content(content: list[Any]) -> Any:
    """Content blocks as JSON: only text is a string; anything else is
    described, not inlined (a model cannot read base64 anyway)."""
    if all(isinstance(block, mcp_types.TextContent) for block in content):
        return _text(content)
    return [_block(block) for block in content]


def _block(block: Any) -> dict[str, Any]:
    match block:
        case mcp_types.TextContent(text=text):
            return {"type": "text", "text": text}
        case mcp_types.ImageContent() | mcp_types.AudioContent():
            return {"type": block.type, "mime_type": block.mime_type, "bytes": len(block.data) * 3 // 4}
        case mcp_types.ResourceLink():
            return {"type": "resource_link", "uri": str(block.uri), "name": block.name}
        case mcp_types.EmbeddedResource(resource=mcp_types.TextResourceContents() as r):
            return {"type": "resource", "uri": str(r.uri), "text": r.text}
        case mcp_types.EmbeddedResource(resource=r):
            return {"type": "resource", "uri": str(r.uri), "mime_type": r.mime_type, "bytes": len(r.blob) * 3 // 4}
        case _:
            return {"type": str(getattr(block, "type", type(block).__name__))}
