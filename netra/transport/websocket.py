"""RFC 6455 on a non-blocking socket: netra's WebSocket transport.

Reads and writes go straight to the socket: a write is one ``send`` call
that normally takes everything (no task switch, no lock, no shield), and
only what the kernel cannot take waits in the backlog (see
:mod:`netra.transport.base`). Reads wait with ``trio.lowlevel.wait_readable``
under a deadline that doubles as the heartbeat: a client silent for
``heartbeat_interval_s`` gets a ping, and one still silent
``heartbeat_timeout_s`` later is gone. Every cancel scope here is an
ordinary one: nothing is shielded, so cancelling a connection always works.
"""

from __future__ import annotations

import socket

import trio

from .base import Transport
from .frames import (
    CLOSE_ABNORMAL,
    CLOSE_NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    ProtocolError,
    close_frame,
    control_frame,
    text_frames,
)

_RECV = 65536


class WebSocketTransport(Transport):
    __slots__ = (
        "_sock", "_decoder", "_backlog", "_closed", "_recv_done", "_waited",
        "_interval", "_timeout", "_last_rx", "_ping_at", "_pong_queued", "protocol_error",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message_bytes: int,
        write_timeout_s: float,
        heartbeat_interval_s: float = 0.0,
        heartbeat_timeout_s: float = 20.0,
        buffered: bytes = b"",
    ) -> None:
        super().__init__(write_timeout_s=write_timeout_s)
        self._sock = sock
        self._decoder = FrameDecoder(max_message_bytes)
        if buffered:
            self._decoder.feed(buffered)
        self._backlog: list[bytes] = []
        self._closed = False  # the socket is released
        self._recv_done = False  # nothing more will be read
        self._waited = True  # receive() blocked since it last returned (trio fairness)
        self._interval = heartbeat_interval_s
        self._timeout = heartbeat_timeout_s
        self._last_rx = trio.current_time()
        self._ping_at: float | None = None  # when our unanswered ping went out
        self._pong_queued = False
        #: The framing error that ended the connection, if any.
        self.protocol_error: ProtocolError | None = None

    # -- receiving ------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        if not self._waited:
            # the last message came without waiting: let other tasks run, so a
            # client that keeps the socket full cannot monopolise the loop
            await trio.lowlevel.checkpoint()
        self._waited = False
        decoder = self._decoder
        while True:
            try:
                item = decoder.next()
            except ProtocolError as exc:
                self.protocol_error = exc
                self.lost = "protocol"
                self._recv_done = True
                self.send_close(exc.code, exc.reason)
                return None
            if item is not None:
                op, payload = item
                if op == OP_TEXT or op == OP_BINARY:
                    return payload  # type: ignore[return-value]
                if op == OP_PING:
                    self._pong(payload)  # type: ignore[arg-type]
                elif op == OP_CLOSE:
                    code, _reason = payload  # type: ignore[misc]
                    self.peer_close_code = code
                    self._recv_done = True
                    if not self.send_closed:  # echo it, as the RFC asks
                        self._send_close_frame(close_frame(None if code == CLOSE_NO_STATUS else code))
                    return None
                # OP_PONG: the peer is alive, which the read already showed
                continue
            if self._recv_done or self._closed:
                return None
            try:
                data = self._sock.recv(_RECV)
            except BlockingIOError:
                if not await self._wait_readable():
                    return None
                continue
            except OSError:
                data = b""
            if not data:
                self._recv_done = True
                if self.peer_close_code is None:
                    self.peer_close_code = CLOSE_ABNORMAL
                    self.lost = self.lost or "eof"
                return None
            if self._interval > 0:
                self._last_rx = trio.current_time()
                self._ping_at = None
            decoder.feed(data)

    async def _wait_readable(self) -> bool:
        """Wait for data; False when the peer is gone (silent past the heartbeat, or aborted)."""
        self._waited = True
        try:
            if self._interval <= 0:
                await trio.lowlevel.wait_readable(self._sock)
                return True
            while True:
                if self._ping_at is None:
                    deadline = self._last_rx + self._interval
                else:
                    deadline = self._ping_at + self._timeout
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(self._sock)
                    return True
                if self._ping_at is not None:  # no answer to our ping: gone
                    self.lost = "heartbeat"
                    self.peer_close_code = CLOSE_ABNORMAL
                    self._recv_done = True
                    self.abort()
                    return False
                self._ping_at = trio.current_time()
                self._write(control_frame(OP_PING, b"netra"))
        except (trio.ClosedResourceError, OSError):
            self._recv_done = True
            if self.peer_close_code is None:
                self.peer_close_code = CLOSE_ABNORMAL
            return False

    def _pong(self, payload: bytes) -> None:
        if self.send_closed:
            return
        if self._backlogged:
            # a client pinging without reading gets one pong waiting, not one per ping
            if self._pong_queued:
                return
            self._pong_queued = True
        self._write(control_frame(OP_PONG, payload))

    # -- sending --------------------------------------------------------------

    def send(self, payloads: list[bytes]) -> None:
        if not self.send_closed:
            self._write(text_frames(payloads))

    def send_close(self, code: int, reason: str = "") -> None:
        if not self.send_closed:
            self.local_close_code = code
            self._send_close_frame(close_frame(code, reason))

    def _send_close_frame(self, frame: bytes) -> None:
        self.send_closed = True
        self._write(frame)

    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._backlogged:
            self._backlog.append(data)
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.lost = self.lost or "reset"
            self.abort()
            return
        if sent != len(data):
            self._backlog.append(data[sent:])
            self._behind()

    def _flush_backlog(self) -> bool:
        if self._closed:
            raise trio.ClosedResourceError
        backlog = self._backlog
        data = backlog[0] if len(backlog) == 1 else b"".join(backlog)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            backlog.clear()
            self._pong_queued = False
            return True
        backlog[:] = [data[sent:]]
        return False

    async def _wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    # -- ending ---------------------------------------------------------------

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.send_closed = True
        self._recv_done = True
        self.lost = self.lost or "aborted"
        if self.peer_close_code is None:
            self.peer_close_code = CLOSE_ABNORMAL  # it ended without a close frame
        self._backlog.clear()
        try:
            # RST rather than a lingering FIN: nothing more is owed to this peer
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.send_closed = True
        self._recv_done = True
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint_if_cancelled()


