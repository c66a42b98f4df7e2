"""Test support that ships with netra: a real server in the current trio run.

``open_server`` starts the real hypercorn server on an ephemeral loopback
port inside the caller's nursery, so tests talk to it over real sockets with
real WebSocket clients, and can still look at the hub (limiters, counters,
the task tree) directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .auth import mint_token
from .config import Config
from .hub import Hub
from .server import Server

TEST_SECRET = "netra-test-secret-0123456789abcdef"


def config_for_tests(**overrides: Any) -> Config:
    base = dict(
        host="127.0.0.1",
        port=0,
        jwt_secret=TEST_SECRET,
        database_url="none",
        chaos_tools=True,
        heartbeat_interval_s=0.0,  # see netra.server.hypercorn_config
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
