"""One MCP server's connection, kept open by a task of the hub's nursery.

:meth:`McpConnection.run` opens a session, lists the server's tools, and
holds the session until it breaks; then it opens another: at once if the
session had served a minute or more, else after 1, 2, 4 ... up to 30 s,
doubling while attempts keep failing. Runs call tools
through :meth:`McpConnection.call` from their own tasks; a call is never
retried (a tool may have acted before its server died), so one that finds
the connection broken fails, and a call that finds the server down asks for
an attempt at once (unless one failed within the last second) and waits for
it, within its run's timeout for the call.

A stdio server that dies while idle is noticed by the next call, or by the
next ``/readyz`` (:meth:`check` lists the tools, a cheap request every
server answers).

This module knows nothing of the SDK: it gets sessions from an ``opener``
(:func:`netra.mcp.client.open_session` in production), and every failure it
sees is a :class:`McpUnavailable`, so its logic runs under the autojump
clock in tests with a fake opener.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import attrs
import trio

from .config import McpServerConfig
from .errors import McpUnavailable
from .tools import ToolInfo

log = logging.getLogger("netra.mcp")

#: Waits between failed attempts double from the first to the most.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
#: A session that lasted this long was not a crash loop: retry at once after it.
STABLE_S = 60.0
#: A call asks for an attempt only if none failed within this time.
CALL_RETRY_S = 1.0


class Session(Protocol):
    async def list_tools(self) -> tuple[ToolInfo, ...]: ...

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any: ...


Opener = Callable[[McpServerConfig], AbstractAsyncContextManager[Session]]


@attrs.define(eq=False)
class McpConnection:
    config: McpServerConfig
    opener: Opener
    #: Called in this connection's task when its tool listing changed.
    on_listing: Callable[[McpConnection], None] = lambda connection: None
    state: Literal["connecting", "ready", "down"] = "connecting"
    #: Why the server is down (None while connecting or ready).
    problem: str | None = None
    #: The tools it listed last (None: never listed).
    listing: tuple[ToolInfo, ...] | None = None
    #: Sessions opened so far, and attempts made.
    sessions: int = 0
    attempts: int = 0
    #: Set once the first attempt has ended either way (start-up waits for it).
    first_settled: trio.Event = attrs.field(factory=trio.Event)
    limiter: trio.CapacityLimiter | None = attrs.field(init=False)
    _session: Session | None = None
    _lost: trio.Event = attrs.field(factory=trio.Event)
    _lost_reason: str = ""
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _retry: trio.Event = attrs.field(factory=trio.Event)
    #: When an attempt last failed to open a session (not: a session broke).
    _failed_at: float = -math.inf

    def __attrs_post_init__(self) -> None:
        concurrency = self.config.concurrency
        self.limiter = trio.CapacityLimiter(concurrency) if concurrency else None

    @property
    def name(self) -> str:
        return self.config.name

    async def run(self) -> None:
        """Keep a session open until cancelled (see the module docstring)."""
        streak = 0
        while True:
            problem, lasted = await self._session_once()
            self._set("down", problem)
            streak = 0 if lasted is not None and lasted >= STABLE_S else streak + 1
            delay = 0.0 if streak == 0 else min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (streak - 1))
            with trio.move_on_after(delay):
                await self._retry.wait()
            self._retry = trio.Event()

    async def _session_once(self) -> tuple[str, float | None]:
        """Open a session and hold it until it breaks: what broke it, and for
        how long it was up (None: it never was)."""
        self.attempts += 1
        self._lost = trio.Event()
        self._set("connecting")
        timeout = self.config.connect_timeout_s
        up_since: float | None = None
        problem = f"no answer within {timeout:g}s (connect_timeout_s)"
        try:
            with trio.move_on_after(timeout) as connecting:
                async with self.opener(self.config) as session:
                    listing = await session.list_tools()
                    connecting.deadline = math.inf
                    up_since = trio.current_time()
                    self._up(session, listing)
                    await self._lost.wait()
                    problem = self._lost_reason
        except McpUnavailable as exc:
            problem = problem if self._lost.is_set() else exc.message
        finally:
            self._session = None
        if up_since is None:
            self._failed_at = trio.current_time()
            return problem, None
        return problem, trio.current_time() - up_since

    def _up(self, session: Session, listing: tuple[ToolInfo, ...]) -> None:
        self._session = session
        self.sessions += 1
        self._set("ready")
        log.info("MCP server %s ready: %d tools", self.name, len(listing), extra={"mcp_server": self.name})
        if listing != self.listing:
            self.listing = listing
            self.on_listing(self)

    def _lose(self, session: Session, reason: str) -> None:
        """``session`` broke (seen by a call or a check): the run task closes
        it and reconnects. A call on an older session changes nothing."""
        if session is self._session and not self._lost.is_set():
            self._session = None
            self._lost_reason = reason
            self._lost.set()
            self._set("down", reason)

    def _set(self, state: Literal["connecting", "ready", "down"], problem: str | None = None) -> None:
        if state == "down" and (self.state, self.problem) != (state, problem):
            log.warning("MCP server %s unavailable: %s", self.name, problem, extra={"mcp_server": self.name})
        self.state, self.problem = state, problem
        if state != "connecting":
            self.first_settled.set()
        self._changed.set()
        self._changed = trio.Event()

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        """Call tool ``name``; its result as JSON. Raises ToolError (the tool
        failed) or McpUnavailable (no connection, or it broke meanwhile)."""
        if self.limiter is None:
            return await self._call(name, arguments)
        async with self.limiter:
            return await self._call(name, arguments)

    async def _call(self, name: str, arguments: dict[str, Any]) -> Any:
        session = self._session if self.state == "ready" else None
        if session is None:
            session = await self._wait_for_session()
        try:
            return await session.call_tool(name, arguments)
        except McpUnavailable as exc:
            self._lose(session, exc.message)
            raise McpUnavailable(
                f"MCP server {self.name!r} went away during the call ({exc.message}); netra is reconnecting"
            ) from None

    async def _wait_for_session(self) -> Session:
        asked_after: int | None = None
        while True:
            if self.state == "ready" and self._session is not None:
                return self._session
            if self.state == "down":
                recent = trio.current_time() - self._failed_at < CALL_RETRY_S
                if (asked_after is not None and self.attempts > asked_after) or (asked_after is None and recent):
                    raise McpUnavailable(f"MCP server {self.name!r} is unavailable: {self.problem}")
                if asked_after is None:
                    asked_after = self.attempts
                    self._retry.set()
            await self._changed.wait()

    async def check(self, timeout_s: float) -> str | None:
        """None when the server answers now; else what is wrong (a broken
        session is dropped, so the run task reconnects)."""
        session = self._session if self.state == "ready" else None
        if session is None:
            return self.problem or "connecting"
        with trio.move_on_after(timeout_s):
            try:
                listing = await session.list_tools()
            except McpUnavailable as exc:
                self._lose(session, exc.message)
                return exc.message
            if listing != self.listing and session is self._session:
                self.listing = listing
                self.on_listing(self)
            return None
        return f"no answer within {timeout_s:g}s"
