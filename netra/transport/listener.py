"""One listening socket for everything: netra's WebSocket path and the HTTP side.

The accept loop reads each new connection's request line (under
``handshake_timeout_s``) and routes it: ``GET /ws`` goes to netra's own
WebSocket handshake, anything else, with the bytes already read, to the
HTTP side (hypercorn serving the quart app). Every connection counts
against ``max_connections`` from its first byte, whatever it speaks and
whether or not it ever authenticates; past the cap a new connection gets a
503 and is closed at once.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import attrs
import trio

from .handshake import MAX_HEAD_BYTES, error_response, is_upgrade_path

log = logging.getLogger("netra.transport")

#: accept() errors that mean "out of resources for now", not "broken listener".
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@attrs.frozen(kw_only=True)
class ListenerLimits:
    max_connections: int
    handshake_timeout_s: float
    ws_path: bytes = b"/ws"


UpgradeHandler = Callable[[socket.socket, bytes, bytes], Awaitable[None]]
HttpHandler = Callable[[socket.socket, bytes], Awaitable[None]]


@attrs.define(eq=False)
class Listener:
    sock: socket.socket
    limits: ListenerLimits
    on_upgrade: UpgradeHandler
    on_http: HttpHandler
    #: Called with a reason for each connection refused or dropped before routing.
    on_refused: Callable[[str], None] = lambda reason: None
    #: Open client connections, from their first byte to their close.
    open_connections: int = 0
    _closed: bool = False

    @classmethod
    def bind(
        cls, host: str, port: int, *, backlog: int = 4096, reuse_port: bool = False, **kwargs: object
    ) -> Listener:
        """Listen on ``host:port``.

        ``reuse_port`` sets SO_REUSEPORT, so that the workers of ``netra
        serve --workers N`` all listen on one port and the kernel spreads
        new connections among them; a single server never shares its port.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=reuse_port)
        sock.setblocking(False)
        return cls(sock=sock, **kwargs)  # type: ignore[arg-type]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop accepting (connections already accepted go on)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def serve(self, handler_nursery: trio.Nursery) -> None:
        """Accept until closed; each connection runs in ``handler_nursery``."""
        sock = self.sock
        try:
            while not self._closed:
                await trio.lowlevel.wait_readable(sock)
                while True:
                    try:
                        conn, _addr = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in _RESOURCE_ERRORS:
                            log.warning("cannot accept a connection: %s", exc.strerror)
                            self.on_refused("resources")
                            await trio.sleep(0.1)
                            break
                        raise
                    conn.setblocking(False)
                    if self.open_connections >= self.limits.max_connections:
                        _refuse(conn, error_response(503, "busy", "too many connections"))
                        self.on_refused("max_connections")
                        continue
                    try:
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:
                        pass
                    self.open_connections += 1
                    handler_nursery.start_soon(self._route, conn)
                await trio.lowlevel.checkpoint()
        except (trio.ClosedResourceError, OSError):
            if not self._closed:
                raise

    async def _route(self, conn: socket.socket) -> None:
        try:
            head = await self._read_head(conn)
            if head is None:
                return
            buffered, first_line, is_ws = head
            if is_ws:
                await self.on_upgrade(conn, *buffered)
            else:
                await self.on_http(conn, first_line)
        finally:
            self.open_connections -= 1
            if conn.fileno() != -1:
                trio.lowlevel.notify_closing(conn)
                conn.close()

    async def _read_head(self, conn: socket.socket) -> tuple[tuple[bytes, bytes], bytes, bool] | None:
        """Read the request line; for the WebSocket path, the whole head.
        Returns ((head, rest), everything read, is_websocket) or None when
        the client left, was too slow or sent too much."""
        buf = bytearray()
        is_ws: bool | None = None
        with trio.move_on_after(self.limits.handshake_timeout_s) as waited:
            while True:
                if is_ws is None:
                    line_end = buf.lstrip(b"\r\n").find(b"\r\n")
                    if line_end >= 0:
                        is_ws = is_upgrade_path(bytes(buf.lstrip(b"\r\n")[:line_end]), self.limits.ws_path)
                        if not is_ws:
                            return (b"", b""), bytes(buf), False
                if is_ws:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        return (bytes(buf[:end + 4]), bytes(buf[end + 4:])), b"", True
                if len(buf) >= MAX_HEAD_BYTES:
                    if is_ws:
                        _refuse(conn, error_response(431, "too_large", "request head too large"))
                        self.on_refused("head_too_large")
                        return None
                    return (b"", b""), bytes(buf), False  # the HTTP side answers it
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(conn)
                    continue
                except OSError:
                    return None
                if not data:
                    return None
                buf += data
        if waited.cancelled_caught:
            self.on_refused("handshake_timeout")
            if is_ws:
                _refuse(conn, error_response(408, "timeout", "request head not received in time"))
        return None


def _refuse(conn: socket.socket, response: bytes) -> None:
    """Best effort, never waiting: one send of a short response, then close."""
    try:
        conn.send(response)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()
