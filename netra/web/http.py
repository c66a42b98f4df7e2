"""The HTTP side: hypercorn serving the quart app on connections the
listener hands over, each under netra's write deadline.

Hypercorn's trio connection handler (``hypercorn.trio.tcp_server.TCPServer``)
takes any trio stream. netra gives it a :class:`DeadlineStream`: the socket,
with the bytes the listener already read put back in front, and a deadline
on every write. Hypercorn shields its writes from cancellation, so without
it a client that stops reading (say, one pipelining requests without
reading the responses) would hold the connection forever; a deadline inside
the write still fires under that shield, and a write the client has not
taken within ``write_timeout_s`` cuts the connection.

Once a write has failed (cut by the deadline, or reset by the client),
nothing more can happen on that connection, so netra cancels hypercorn's
handler for it too: hypercorn's reader of a connection whose pipelined
requests paused it waits for a wake-up that a failed write never sends,
which would keep the socket and its tasks forever.

Reads have a deadline too, hypercorn's ``read_timeout``, but netra applies
it itself, only while none of the connection's requests is being answered:
hypercorn's own is one deadline on every read, so a streamed response
(AG-UI's ``/agui``) whose client had nothing more to send was cut after
``read_timeout``. An idle connection is still let go after it, counted from
the end of its last response.
"""

from __future__ import annotations

import copy
import logging
import math
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

log = logging.getLogger("netra.web")

_LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"


class DeadlineStream(trio.abc.HalfCloseableStream):
    """A socket stream that replays ``buffered`` first and bounds every write."""

    def __init__(
        self, sock: socket.socket, buffered: bytes, *, write_timeout_s: float,
        read_timeout_s: float = math.inf, on_abort: Any = None, on_broken: Any = None,
    ) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffered = buffered
        self._write_timeout_s = write_timeout_s
        self._read_timeout_s = read_timeout_s
        self._on_abort = on_abort  # a write passed its deadline
        self._on_broken = on_broken  # a write failed, whatever the reason
        self._answering = 0  # requests of this connection being answered now
        self._reading: trio.CancelScope | None = None  # the read waiting now

    @property
    def socket(self) -> trio.socket.SocketType:
        """Hypercorn reads the peer and local addresses from here."""
        return self._stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            with trio.move_on_after(self._write_timeout_s):
                await self._stream.send_all(data)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._broken()
            raise
        self.abort()
        if self._on_abort is not None:
            self._on_abort()
        self._broken()
        raise trio.BrokenResourceError("the client did not take a response within the write deadline")

    def _broken(self) -> None:
        if self._on_broken is not None:
            self._on_broken()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._buffered:
            data, self._buffered = self._buffered, b""
            await trio.lowlevel.checkpoint()
            return data
        with trio.CancelScope(deadline=self._read_deadline()) as self._reading:
            try:
                return await self._stream.receive_some(max_bytes)
            finally:
                self._reading = None
        # hypercorn ends the connection on this, as on its own read timeout
        raise trio.TooSlowError("the client sent nothing within the read deadline")

    @contextmanager
    def answering(self) -> Iterator[None]:
        """While a request is being answered, reading waits without a deadline."""
        self._answering += 1
        self._move_read_deadline()
        try:
            yield
        finally:
            self._answering -= 1
            self._move_read_deadline()

    def _read_deadline(self) -> float:
        return math.inf if self._answering else trio.current_time() + self._read_timeout_s

    def _move_read_deadline(self) -> None:
        if self._reading is not None:
            self._reading.deadline = self._read_deadline()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def abort(self) -> None:
        """Cut the connection (RST), waking its reader and writer."""
        sock = self._stream.socket
        if sock.fileno() == -1:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        sock.close()  # trio's close notifies every task waiting on it


class HttpSide:
    """The quart app behind hypercorn, for the connections the listener hands over."""

    def __init__(self, app: Any, config: HypercornConfig, *, write_timeout_s: float, on_abort: Any = None) -> None:
        self._app = ASGIWrapper(app)
        # netra applies hypercorn's read timeout itself, between responses (see DeadlineStream)
        self._read_timeout_s = config.read_timeout if config.read_timeout is not None else math.inf
        self._config = copy.copy(config)
        self._config.read_timeout = None
        self._context = WorkerContext(None)
        self._state: dict[str, Any] = {}
        self._write_timeout_s = write_timeout_s
        self._on_abort = on_abort

    async def run_lifespan(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the app's lifespan: ``task_status.started`` once its startup
        is done; :meth:`shutdown` runs its shutdown."""
        lifespan = Lifespan(self._app, self._config, self._state)
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            self._lifespan = lifespan
            task_status.started()
            await trio.sleep_forever()

    async def shutdown(self) -> None:
        await self._lifespan.wait_for_shutdown()

    async def serve(self, sock: socket.socket, buffered: bytes) -> None:
        with trio.CancelScope() as scope:
            stream = DeadlineStream(
                sock, buffered, write_timeout_s=self._write_timeout_s, read_timeout_s=self._read_timeout_s,
                on_abort=self._on_abort, on_broken=scope.cancel,
            )
            app = _Answering(self._app, stream)
            server = TCPServer(app, self._config, self._context, ConnectionState(self._state.copy()), stream)
            await server.run()

    async def terminate(self) -> None:
        """Ask keep-alive connections to close after their current request."""
        await self._context.terminated.set()


class _Answering:
    """The app as one connection's requests reach it: while it answers one,
    that connection's reads have no deadline (see DeadlineStream)."""

    def __init__(self, app: Any, stream: DeadlineStream) -> None:
        self._app = app
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
        with self._stream.answering():
            await self._app(scope, receive, send, sync_spawn, call_soon)
