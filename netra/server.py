"""Serving: one listening socket, netra's WebSocket path, hypercorn for HTTP,
signals, and a graceful drain.

The :class:`netra.transport.Listener` accepts every connection and routes
it: ``GET /ws`` to :func:`netra.web.ws.serve_upgrade`, the rest to
hypercorn (:mod:`netra.web.http`). On SIGTERM/SIGINT netra drains: it
refuses new work, gives running runs ``drain_grace_s`` to finish, cancels
the rest (``agent_cancelled`` reason ``shutdown``), closes every connection
with 1001 once its events are flushed, then stops accepting and lets the
HTTP side finish.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Callable

import attrs
import trio
from hypercorn.config import Config as HypercornConfig

from . import errors
from .hub import Hub
from .runs import SERVER
from .session import Session
from .transport import Listener, ListenerLimits
from .web.app import create_app
from .web.http import HttpSide
from .web.ws import serve_upgrade

log = logging.getLogger("netra")


def hypercorn_config(hub: Hub) -> HypercornConfig:
    """What hypercorn needs for the HTTP side (it never sees a WebSocket)."""
    c = hub.config
    hc = HypercornConfig()
    hc.keep_alive_timeout = 5
    hc.read_timeout = c.handshake_timeout_s
    hc.h11_max_incomplete_size = 16 * 1024
    hc.graceful_timeout = c.close_timeout_s + 1
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    return hc


async def drain(hub: Hub, *, poll_s: float = 0.02) -> None:
    """Finish or cancel every run and close every connection with 1001."""
    hub.draining = True
    log.info("draining", extra={"connections": len(hub.sessions)})
    with trio.move_on_after(hub.config.drain_grace_s):
        while True:
            for session in list(hub.sessions):
                if not session.runs.runs:
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
    #: Share the port with other processes (the workers of ``netra serve --workers``).
    reuse_port: bool = False
    urls: list[str] = attrs.field(factory=list)
    listener: Listener | None = None
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
        hub = self.hub
        c, m = hub.config, hub.metrics
        http = HttpSide(
            create_app(hub), hypercorn_config(hub),
            write_timeout_s=c.write_timeout_s, on_abort=m.http_write_aborts.inc,
        )
        listener = self.listener = Listener.bind(
            c.host, c.port, reuse_port=self.reuse_port,
            limits=ListenerLimits(max_connections=c.max_connections, handshake_timeout_s=c.handshake_timeout_s),
            on_upgrade=functools.partial(serve_upgrade, hub),
            on_http=http.serve,
            on_refused=lambda reason: m.connections_dropped.labels(reason).inc(),
        )
        m.open_sockets.set_function(lambda: listener.open_connections)
        try:
            async with trio.open_nursery() as services:
                await hub.open(services)
                if hub.cluster is not None:
                    await services.start(hub.cluster.run)
                await services.start(http.run_lifespan)
                services.start_soon(hub.flusher.run)
                services.start_soon(_watch_loop_lag, hub)
                async with trio.open_nursery() as connections:
                    services.start_soon(listener.serve, connections)
                    host, port = listener.address
                    self.urls = [f"http://{'[' + host + ']' if ':' in host else host}:{port}"]
                    log.info("listening on %s", self.urls[0])
                    task_status.started(self)
                    await self._stop.wait()
                    await drain(hub)
                    listener.close()
                    await http.terminate()
                    connections.cancel_scope.deadline = trio.current_time() + c.close_timeout_s + 1
                await http.shutdown()
                services.cancel_scope.cancel()
        finally:
            listener.close()
            with trio.CancelScope(shield=True):
                await hub.aclose()
            self._stopped.set()


async def _watch_loop_lag(hub: Hub, *, interval_s: float = 0.25) -> None:
    """Event-loop lag: how much later than asked a sleeping task wakes up.
    A busy or blocked loop shows here before it shows anywhere else."""
    while True:
        asked = trio.current_time() + interval_s
        await trio.sleep(interval_s)
        hub.metrics.loop_lag.set(max(0.0, trio.current_time() - asked))


async def serve_forever(
    hub: Hub, *, on_ready: Callable[[Server], None] | None = None, reuse_port: bool = False
) -> None:
    """Run until SIGTERM or SIGINT, then drain and return (exit status 0)."""
    server = Server(hub, reuse_port=reuse_port)
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
