"""What a session needs from a connection, and the write deadline every
transport keeps.

A :class:`Transport` carries whole messages: :meth:`~Transport.receive`
returns the next one from the client, :meth:`~Transport.send` queues a batch
for the client and never blocks, :meth:`~Transport.send_close` queues the
close frame, :meth:`~Transport.abort` cuts the connection at once. Sending
never blocks because a session must never wait on its client: what the
socket cannot take now waits in the transport's backlog, drained by a task
in the connection's nursery, and a backlog that has not drained within
``write_timeout_s`` calls :attr:`~Transport.on_stalled` (the session closes
4430; if even that cannot be delivered within the close timeout, it aborts).
A client that stops reading is therefore released within
``write_timeout_s`` plus the close timeout, whatever it was sent.

Two implementations: :class:`netra.transport.websocket.WebSocketTransport`
(RFC 6455 on a socket) and :class:`netra.transport.memory.MemoryTransport`
(in memory, for tests under the autojump clock).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import trio


def _nothing() -> None:
    pass


class Transport(abc.ABC):
    __slots__ = (
        "write_timeout_s", "peer_close_code", "local_close_code", "send_closed", "lost",
        "on_stalled", "on_drained", "_nursery", "_backlogged",
    )

    def __init__(self, *, write_timeout_s: float) -> None:
        self.write_timeout_s = write_timeout_s
        #: The close code the peer sent (1005: a close frame without one;
        #: 1006: it went away without a close frame). None while it has not.
        self.peer_close_code: int | None = None
        #: The close code this side sent, if any.
        self.local_close_code: int | None = None
        #: Nothing more can be sent: the close frame is queued or the socket is gone.
        self.send_closed = False
        #: Why the connection was lost without a close handshake (``eof``,
        #: ``heartbeat``, ``aborted``, ``protocol``...), for logs and metrics.
        self.lost: str | None = None
        #: Called when a backlog has not drained within ``write_timeout_s``.
        self.on_stalled: Callable[[], None] = self.abort
        #: Called when a backlog has drained (the session may send what it held).
        self.on_drained: Callable[[], None] = _nothing
        self._nursery: trio.Nursery | None = None
        self._backlogged = False

    def start(self, nursery: trio.Nursery) -> None:
        """Attach to the connection's nursery, which owns the drain task."""
        self._nursery = nursery

    @property
    def backlogged(self) -> bool:
        """The client is behind: sent data waits in the transport."""
        return self._backlogged

    @abc.abstractmethod
    async def receive(self) -> str | bytes | None:
        """The next message from the client; None once it closed or is gone."""

    @abc.abstractmethod
    def send(self, payloads: list[bytes]) -> None:
        """Queue text messages (UTF-8 payloads) for the client; never blocks."""

    @abc.abstractmethod
    def send_close(self, code: int, reason: str = "") -> None:
        """Queue the close frame after everything sent; nothing is sent after it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Cut the connection now, waking every task waiting on it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection (the socket's file descriptor)."""

    # -- the backlog, shared by every transport -------------------------------

    @abc.abstractmethod
    def _flush_backlog(self) -> bool:
        """Write what the backlog holds as far as possible; True once empty."""

    @abc.abstractmethod
    async def _wait_writable(self) -> None:
        """Wait until more can be written (ClosedResourceError once aborted)."""

    def _behind(self) -> None:
        """A write could not complete: drain in the background, with a deadline."""
        if self._backlogged:
            return
        self._backlogged = True
        if self._nursery is None:  # nothing owns a drain task yet: cannot wait
            self.abort()
            return
        self._nursery.start_soon(self._drain, trio.current_time() + self.write_timeout_s)

    async def _drain(self, stall_at: float) -> None:
        stalled = False
        try:
            while True:
                with trio.move_on_at(math.inf if stalled else stall_at) as waited:
                    await self._wait_writable()
                if waited.cancelled_caught:
                    stalled = True
                    self.on_stalled()
                    continue
                if self._flush_backlog():
                    break
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            self.lost = self.lost or "aborted"
            return
        self._backlogged = False
        self.on_drained()
