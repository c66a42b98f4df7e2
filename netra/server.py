"""Serving: hypercorn's trio worker, signals, and a graceful drain.

Hypercorn alone, on shutdown, waits its graceful timeout and then drops
sockets without a close frame. netra drains first: on SIGTERM/SIGINT it
refuses new work, gives running runs ``drain_grace_s`` to finish, cancels
the rest (``agent_cancelled`` reason ``shutdown``), closes every connection
with 1001 once its events are flushed, and only then lets hypercorn stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from . import errors
from .hub import Hub
from .runs import SERVER
from .session import Session
from .web import _hypercorn_fixes
from .web.app import create_app

log = logging.getLogger("netra")


def hypercorn_config(hub: Hub) -> HypercornConfig:
    _hypercorn_fixes.install()
    c = hub.config
    hc = HypercornConfig()
    hc.bind = [f"{c.host}:{c.port}"]
    hc.websocket_max_message_size = c.max_message_bytes
    # the heartbeat: hypercorn pings; a peer silent (no pong, no frame) for
    # interval + timeout hits the read timeout and is treated as gone
    # (hypercorn's ping task outlives a closed connection by up to one interval)
    if c.heartbeat_interval_s > 0:
        hc.websocket_ping_interval = c.heartbeat_interval_s
        hc.read_timeout = c.heartbeat_interval_s + c.heartbeat_timeout_s
    hc.graceful_timeout = c.close_timeout_s + 1
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    hc.backlog = 4096
    return hc


async def drain(hub: Hub, *, poll_s: float = 0.02) -> None:
    """Finish or cancel every run and close every connection with 1001."""
    hub.draining = True
    log.info("draining", extra={"connections": len(hub.sessions)})
    with trio.move_on_after(hub.config.drain_grace_s):
        while True:
            for session in list(hub.sessions):
                if not session.runs:
                    _shut(session)
            if not hub.sessions:
                break
            await trio.sleep(poll_s)
    for session in list(hub.sessions):
        _shut(session)
    with trio.move_on_after(hub.config.close_timeout_s + 1):
        while hub.sessions:
            await trio.sleep(poll_s)


def _shut(session: Session) -> None:
    session.close(
        errors.CLOSE_GOING_AWAY, "server shutting down", cancel_reason="shutdown", cause="shutdown", by=SERVER
    )


@attrs.define(eq=False)
class Server:
    """A running netra server; ``urls`` is known once it listens."""

    hub: Hub
    urls: list[str] = attrs.field(factory=list)
    _stop: trio.Event = attrs.field(factory=trio.Event)
    _stopped: trio.Event = attrs.field(factory=trio.Event)

    @property
    def http_url(self) -> str:
        return self.urls[0]

    @property
    def ws_url(self) -> str:
        return self.urls[0].replace("http://", "ws://", 1) + "/ws"

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        app = create_app(self.hub)
        drained = trio.Event()

        async def shutdown_trigger() -> None:
            await self._stop.wait()
            await drain(self.hub)
            drained.set()

        async with trio.open_nursery() as nursery:
            self.urls = await nursery.start(_serve, app, hypercorn_config(self.hub), shutdown_trigger)
            nursery.start_soon(_watch_loop_lag, self.hub, drained)
            nursery.start_soon(_sweep_slow_consumers, self.hub, drained)
            task_status.started(self)
        self._stopped.set()


async def _watch_loop_lag(hub: Hub, stop: trio.Event, *, interval_s: float = 0.25) -> None:
    """Event-loop lag: how much later than asked a sleeping task wakes up.
    A busy or blocked loop shows here before it shows anywhere else."""
    while not stop.is_set():
        asked = trio.current_time() + interval_s
        with trio.move_on_after(interval_s):
            await stop.wait()
        hub.metrics.loop_lag.set(max(0.0, trio.current_time() - asked))


async def _sweep_slow_consumers(hub: Hub, stop: trio.Event) -> None:
    """A client that stops reading blocks its writer inside one socket write
    long before its event queue fills (a busy run fills it slowly). One sweep
    for all connections finds writers stuck longer than the slow-consumer
    timeout, at a cost of one attribute read per connection per tick."""
    timeout = hub.config.slow_consumer_timeout_s
    tick = max(0.05, timeout / 4)
    while not stop.is_set():
        with trio.move_on_after(tick):
            await stop.wait()
        now = trio.current_time()
        for session in list(hub.sessions):
            since = session.send_since
            if since is not None and now - since > timeout:
                session.slow_consumer()


async def _serve(
    app: object,
    config: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


async def serve_forever(hub: Hub, *, on_ready: Callable[[Server], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and return (exit status 0)."""
    server = Server(hub)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if on_ready is not None:
                on_ready(server)

            async def wait_signal() -> None:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    server.request_stop()
                    return

            nursery.start_soon(wait_signal)
            await server._stopped.wait()
            nursery.cancel_scope.cancel()
