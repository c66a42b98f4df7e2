"""An in-memory transport and the client end that drives it, for tests.

:func:`memory_transport_pair` returns a :class:`MemoryTransport` (what a
session sees) and a :class:`MemoryClient` (what a test holds). Messages
cross as Python strings, with the same rules a socket has: the client's
unread messages count against a buffer of ``capacity_bytes``, past which the
transport is backlogged and its write deadline runs; a close has a code on
each side; a dropped client is seen as 1006. Everything is driven by trio
primitives only, so tests run under the autojump clock, fast and
deterministic.
"""

from __future__ import annotations

import collections

import attrs
import trio

from .base import Transport
from .frames import CLOSE_ABNORMAL


@attrs.frozen
class Closed:
    """What the client reads once the server closed: its code and reason."""

    code: int
    reason: str


class MemoryTransport(Transport):
    __slots__ = (
        "_inbox", "_outbox", "_out_bytes", "_capacity", "_backlog", "_readable", "_has_output",
        "_has_space", "_closed",
    )

    def __init__(self, *, write_timeout_s: float = 5.0, capacity_bytes: int = 65536) -> None:
        super().__init__(write_timeout_s=write_timeout_s)
        self._inbox: collections.deque[str | bytes | int] = collections.deque()
        self._outbox: collections.deque[str | Closed] = collections.deque()
        self._out_bytes = 0
        self._capacity = capacity_bytes
        self._backlog: list[str | Closed] = []
        self._readable = trio.Event()  # the client sent something
        self._has_output = trio.Event()  # the server queued something for the client
        self._has_space = trio.Event()  # the client read something
        self._closed = False

    async def receive(self) -> str | bytes | None:
        await trio.lowlevel.checkpoint()
        while not self._inbox:
            if self._closed or self.peer_close_code is not None:
                return None
            self._readable = trio.Event()
            await self._readable.wait()
        item = self._inbox.popleft()
        if isinstance(item, int):  # the client closed with this code
            self.peer_close_code = item
            if item == CLOSE_ABNORMAL:
                self.lost = "eof"
            elif not self.send_closed:
                self._queue(Closed(item, ""))
                self.send_closed = True
            return None
        return item

    def send(self, payloads: list[bytes]) -> None:
        if not self.send_closed:
            for payload in payloads:
                self._queue(payload.decode("utf-8"))

    def send_close(self, code: int, reason: str = "") -> None:
        if not self.send_closed:
            self.local_close_code = code
            self.send_closed = True
            self._queue(Closed(code, reason))

    def _queue(self, item: str | Closed) -> None:
        if self._closed:
            return
        if self._backlogged:
            self._backlog.append(item)
            return
        self._outbox.append(item)
        self._out_bytes += len(item) if isinstance(item, str) else 2
        self._has_output.set()
        if self._out_bytes > self._capacity:
            self._behind()

    def _flush_backlog(self) -> bool:
        if self._closed:
            raise trio.ClosedResourceError
        while self._backlog and self._out_bytes <= self._capacity:
            item = self._backlog.pop(0)
            self._outbox.append(item)
            self._out_bytes += len(item) if isinstance(item, str) else 2
        self._has_output.set()
        return not self._backlog and self._out_bytes <= self._capacity

    async def _wait_writable(self) -> None:
        while not self._closed and self._out_bytes > self._capacity:
            self._has_space = trio.Event()
            await self._has_space.wait()
        if self._closed:
            raise trio.ClosedResourceError

    def _wake_all(self) -> None:
        self._readable.set()
        self._has_output.set()
        self._has_space.set()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.send_closed = True
        self.lost = self.lost or "aborted"
        if self.peer_close_code is None:
            self.peer_close_code = CLOSE_ABNORMAL  # it ended without a close frame
        self._backlog.clear()
        self._outbox.append(Closed(CLOSE_ABNORMAL, ""))
        self._wake_all()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.send_closed = True
            self._outbox.append(Closed(CLOSE_ABNORMAL, ""))  # the socket is gone after any close frame
            self._wake_all()
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class MemoryClient:
    """The client end: send text, read what the server sent, close or drop."""

    transport: MemoryTransport

    async def send(self, text: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        t = self.transport
        if t._closed or t.peer_close_code is not None:
            raise trio.ClosedResourceError("the connection is closed")
        t._inbox.append(text)
        t._readable.set()

    async def receive(self) -> str | Closed:
        """The next message, or a :class:`Closed` once the server closed or cut."""
        t = self.transport
        while True:
            if t._outbox:
                item = t._outbox.popleft()
                t._out_bytes -= len(item) if isinstance(item, str) else 2
                t._has_space.set()
                await trio.lowlevel.checkpoint()
                return item
            if t._closed:
                return Closed(CLOSE_ABNORMAL, "")
            t._has_output = trio.Event()
            await t._has_output.wait()

    async def close(self, code: int = 1000) -> None:
        """Send a close frame with ``code``."""
        await self.send_code(code)

    async def send_code(self, code: int) -> None:
        await trio.lowlevel.checkpoint()
        t = self.transport
        if t.peer_close_code is None and not t._closed:
            t._inbox.append(code)
            t._readable.set()

    def drop(self) -> None:
        """The network goes away: the server sees 1006."""
        t = self.transport
        if t.peer_close_code is None and not t._closed:
            t._inbox.append(CLOSE_ABNORMAL)
            t._readable.set()

    @property
    def queued_bytes(self) -> int:
        return self.transport._out_bytes


def memory_transport_pair(
    *, write_timeout_s: float = 5.0, capacity_bytes: int = 65536
) -> tuple[MemoryTransport, MemoryClient]:
    transport = MemoryTransport(write_timeout_s=write_timeout_s, capacity_bytes=capacity_bytes)
    return transport, MemoryClient(transport)
