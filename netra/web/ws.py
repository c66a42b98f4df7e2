"""The one module that touches a WebSocket: ASGI messages in and out.

netra serves ``/ws`` at the ASGI layer rather than through quart's websocket
wrapper because quart-trio buffers incoming frames in an unbounded queue; here
hypercorn's bounded app queue applies, so a client that floods is slowed down
at its TCP window instead of growing the server's memory.

Hypercorn's trio worker shields its socket writes, so no cancel scope can
interrupt a send blocked on a client that stopped reading. :meth:`abort` is
the way out: it closes the TCP socket under hypercorn, which wakes the blocked
send with ``ClosedResourceError`` (trio's ``notify_closing``). The socket is
found by following the ASGI ``send`` callable to the hypercorn connection that
owns it; if a future hypercorn hides it, :attr:`abortable` is False and the
slow-consumer test says so.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import attrs
import trio

log = logging.getLogger("netra.web")


def _find_stream(send: Any) -> trio.SocketStream | None:
    """Walk ``send`` -> WSStream.app_send -> protocol.send -> TCPServer.stream."""
    obj: Any = send
    for _ in range(6):
        owner = getattr(obj, "__self__", None)
        if owner is None:
            return None
        stream = getattr(owner, "stream", None)
        if isinstance(stream, trio.SocketStream):
            return stream
        inner = getattr(stream, "transport_stream", None)  # TLS
        if isinstance(inner, trio.SocketStream):
            return inner
        obj = getattr(owner, "send", None)
    return None


@attrs.define(eq=False)
class WebSocket:
    scope: dict[str, Any]
    _receive: Any
    _send: Any
    _stream: trio.SocketStream | None = attrs.field(init=False)
    closed: bool = attrs.field(init=False, default=False)
    #: Close code the peer sent, or 1006 when the connection just ended.
    disconnect_code: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._stream = _find_stream(self._send)

    @property
    def abortable(self) -> bool:
        return self._stream is not None

    def header(self, name: bytes) -> str | None:
        for key, value in self.scope.get("headers", ()):
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    @property
    def subprotocols(self) -> list[str]:
        return list(self.scope.get("subprotocols") or ())

    async def wait_connect(self) -> bool:
        message = await self._receive()
        return message["type"] == "websocket.connect"

    async def reject(self, status: int, body: dict[str, Any]) -> None:
        """Refuse the upgrade with an HTTP response (before any frame)."""
        data = json.dumps(body).encode()
        await self._send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await self._send({"type": "websocket.http.response.body", "body": data})
        self.closed = True

    async def accept(self, subprotocol: str | None) -> None:
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})

    async def receive(self) -> str | bytes | None:
        """The next frame's payload, or None once the peer is gone."""
        if self.closed:
            return None
        message = await self._receive()
        match message["type"]:
            case "websocket.receive":
                text = message.get("text")
                return text if text is not None else (message.get("bytes") or b"")
            case "websocket.disconnect":
                self.closed = True
                self.disconnect_code = message.get("code", 1006)
                return None
            case _:
                return None

    async def send_text(self, text: str) -> None:
        if not self.closed:
            await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    def abort(self) -> None:
        """Cut the TCP connection now, waking any send blocked on it."""
        self.closed = True
        if self._stream is not None:
            try:
                self._stream.socket.close()
            except OSError:  # already gone
                pass
