"""Test support that ships with netra.

``open_server`` starts the real server on an ephemeral loopback port inside
the caller's nursery, so tests talk to it over real sockets with real
WebSocket clients, and can still look at the hub (limiters, counters, the
task tree) directly. ``open_hub`` and ``connect_memory`` run the same
sessions over the in-memory transport instead: no sockets, trio primitives
only, so a test runs under the autojump clock, fast and deterministic.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from .auth import Identity, mint_token
from .config import Config
from .hub import Hub
from .server import Server
from .transport import Closed, MemoryClient, MemoryTransport, memory_transport_pair

TEST_SECRET = "netra-test-secret-0123456789abcdef"


def config_for_tests(**overrides: Any) -> Config:
    base = dict(
        host="127.0.0.1",
        port=0,
        jwt_secret=TEST_SECRET,
        database_url="none",
        chaos_tools=True,
        heartbeat_interval_s=0.0,  # tests that need the heartbeat turn it on
        resume_window_s=0.0,  # a drop cancels its runs at once; resume tests turn it on
    )
    base.update(overrides)
    return Config(**base)


@asynccontextmanager
async def open_server(config: Config | None = None, **build: Any) -> AsyncIterator[Server]:
    hub = Hub.build(config or config_for_tests(), **build)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(hub).run)
        try:
            yield server
        finally:
            server.request_stop()
            with trio.move_on_after(hub.config.drain_grace_s + hub.config.close_timeout_s + 5) as scope:
                await server._stopped.wait()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()


def token_for(server: Server, user_id: str, *, ttl_s: float = 3600.0, **claims: Any) -> str:
    return mint_token(server.hub.config.jwt_secret, user_id, ttl_s=ttl_s, **claims)


# -- in memory: the whole session, no sockets, under the autojump clock ------------


@attrs.define(eq=False)
class MemoryServer:
    """A hub serving in-memory connections: :meth:`connect` opens one."""

    hub: Hub
    _nursery: trio.Nursery

    @asynccontextmanager
    async def connect(
        self, token: str | None = None, *, user_id: str | None = None, capacity_bytes: int = 65536
    ) -> AsyncIterator[MemoryConnection]:
        """A session over an in-memory transport. With a token, it
        authenticates with an auth frame as a browser does; with only a
        ``user_id``, as if the upgrade's Authorization header had been
        verified. ``connected`` is read before this returns (unless refused:
        then ``connection.closed`` says how)."""

        hub = self.hub
        transport, client = memory_transport_pair(
            write_timeout_s=hub.config.write_timeout_s, capacity_bytes=capacity_bytes
        )
        identity = None
        if token is None:
            identity = Identity(user_id=user_id or "user", expires_at=time.time() + 3600)
        self._nursery.start_soon(_serve_memory, hub, transport, identity)
        connection = MemoryConnection(client)
        if token is not None:
            await connection.send({"type": "auth", "token": token})
        try:
            await connection.until("connected")
        except ConnectionEnded:
            pass
        try:
            yield connection
        finally:
            if connection.closed is None and transport.peer_close_code is None:
                await client.close(1000)


@asynccontextmanager
async def open_hub(config: Config | None = None, **build: Any) -> AsyncIterator[MemoryServer]:
    """A hub with its store open and its flusher running, serving sessions
    over the in-memory transport. Nothing listens; everything is trio
    primitives, so tests run under the autojump clock."""
    hub = Hub.build(config or config_for_tests(), **build)
    try:
        async with trio.open_nursery() as nursery:
            await hub.open(nursery)
            nursery.start_soon(hub.flusher.run)
            try:
                yield MemoryServer(hub, nursery)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await hub.aclose()


@attrs.define(eq=False)
class MemoryConnection:
    """The client side of one in-memory connection, speaking protocol v1."""

    client: MemoryClient
    received: list[dict[str, Any]] = attrs.field(factory=list)
    closed: Closed | None = None

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.client.send(message if isinstance(message, str) else json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        """The next event; raises :class:`ConnectionEnded` once the server closed."""
        if self.closed is not None:
            raise ConnectionEnded(self.closed)
        item = await self.client.receive()
        if isinstance(item, Closed):
            self.closed = item
            raise ConnectionEnded(item)
        event = json.loads(item)
        self.received.append(event)
        return event

    async def until(self, kind: str) -> dict[str, Any]:
        while (event := await self.receive())["type"] != kind:
            pass
        return event

    async def run(self, text: str, **fields: Any) -> list[dict[str, Any]]:
        """Send a user_message and return its run's events, to the terminal one."""
        await self.send({"type": "user_message", "text": text, **fields})
        events: list[dict[str, Any]] = []
        while True:
            event = await self.receive()
            if event["type"] == "error":
                raise AssertionError(f"refused: {event}")
            events.append(event)
            if event["type"] in ("agent_completed", "agent_error", "agent_cancelled"):
                return events

    async def wait_closed(self) -> Closed:
        while self.closed is None:
            try:
                await self.receive()
            except ConnectionEnded:
                pass
        return self.closed


class ConnectionEnded(Exception):
    def __init__(self, closed: Closed) -> None:
        super().__init__(f"the server closed the connection ({closed.code} {closed.reason})")
        self.closed = closed


async def _serve_memory(hub: Hub, transport: MemoryTransport, identity: Any) -> None:
    from .web.ws import serve_transport

    try:
        await serve_transport(hub, transport, identity)
    finally:
        await transport.aclose()
