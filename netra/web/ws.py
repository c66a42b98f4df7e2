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
from hypercorn.protocol.events import Data
from wsproto.events import TextMessage
from wsproto.utilities import LocalProtocolError

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


def _find_ws_stream(send: Any) -> Any:
    """hypercorn's WSStream behind the ASGI ``send``, when it has what a
    batched write needs (its wsproto connection and its transport send)."""
    owner = getattr(send, "__self__", None)
    if all(hasattr(owner, name) for name in ("connection", "stream_id", "send", "closed")):
        return owner
    return None


@attrs.define(eq=False)
class WebSocket:
    scope: dict[str, Any]
    _receive: Any
    _send: Any
    _stream: trio.SocketStream | None = attrs.field(init=False)
    _ws_stream: Any = attrs.field(init=False)
    closed: bool = attrs.field(init=False, default=False)  # nothing more may be sent
    disconnected: bool = attrs.field(init=False, default=False)  # websocket.disconnect was received
    #: Close code the peer sent, or 1006 when the connection just ended.
    disconnect_code: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._stream = _find_stream(self._send)
        self._ws_stream = _find_ws_stream(self._send)

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
        if self.disconnected:
            return None
        message = await self._receive()
        match message["type"]:
            case "websocket.receive":
                text = message.get("text")
                return text if text is not None else (message.get("bytes") or b"")
            case "websocket.disconnect":
                self.closed = self.disconnected = True
                self.disconnect_code = message.get("code", 1006)
                return None
            case _:
                return None

    async def finish(self, timeout_s: float) -> None:
        """Read until ``websocket.disconnect`` before the app returns.

        hypercorn delivers that message into the app's bounded queue even
        after the app has finished; if frames nobody will read fill the queue,
        the delivery blocks forever and strands the socket and its tasks. So
        the app drains: first waiting for the peer to finish closing, then,
        if it will not, cutting the socket and draining what was queued."""
        with trio.move_on_after(timeout_s):
            while await self.receive() is not None:
                pass
        if not self.disconnected:
            self.abort()
            with trio.move_on_after(timeout_s):
                while await self.receive() is not None:
                    pass

    async def send_text(self, text: str) -> None:
        if not self.closed:
            await self._send({"type": "websocket.send", "text": text})

    async def send_texts(self, texts: list[str]) -> None:
        """Send several text frames in one write when hypercorn allows it:
        hypercorn's own wsproto connection frames each message (so any
        negotiated compression applies) and the frames go out in one
        transport write, instead of one lock, shielded send and syscall each."""
        stream = self._ws_stream
        if len(texts) == 1 or stream is None:
            for text in texts:
                await self.send_text(text)
            return
        if self.closed or stream.closed:
            return
        try:
            data = b"".join(stream.connection.send(TextMessage(data=text)) for text in texts)
        except LocalProtocolError:  # the peer is closing: nothing more goes out
            return
        await stream.send(Data(stream_id=stream.stream_id, data=data))

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
