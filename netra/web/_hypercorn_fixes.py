"""Two narrow fixes to hypercorn's WebSocket stream, applied when a server starts.

1. Invalid frames get their close code. When a client sends a frame wsproto
cannot accept (a text message that is not valid UTF-8, a protocol violation),
wsproto reports it as a
``CloseConnection`` with the right code (1007, 1002) while the connection is
still open. Hypercorn 0.17-0.18 answers close frames only in the
REMOTE_CLOSING state, so it drops the TCP connection without telling the
client why, and the client sees 1006. The protocol promises 1007. This wraps
``WSStream._handle_events`` so that such a close is sent to the peer first;
everything else is left to hypercorn. ``tests/test_isolation.py`` checks the
1007 end to end, so a hypercorn that changes this code path is noticed.

2. A closed connection lets go at once. Hypercorn's ping task sleeps a whole
``websocket_ping_interval`` before it looks whether its stream closed, and the
connection's task group (so its socket, in CLOSE_WAIT when the peer left)
waits for it: every closed connection held a socket and two tasks for up to
one heartbeat interval (20 s by default), which under churn is thousands of
sockets. The ping loop now runs in a cancel scope, and the stream's
``closed`` attribute cancels it the moment it becomes true (wherever
hypercorn sets it), at no cost to the events and sends in between. ``tests/test_observability.py`` checks that the
server's task count is back to its start seconds after connections close,
with a heartbeat far longer than that.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.protocol import ws_stream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

_MARK = "_netra_fixed"
_PING_SCOPE = "_netra_ping_scope"
_CLOSED = "_netra_closed"


def install() -> None:
    """Idempotent: wraps the method once per process."""
    cls = ws_stream.WSStream
    if getattr(cls, _MARK, False):
        return
    original = cls._handle_events

    async def _handle_events(self: Any) -> None:
        connection = self.connection
        events = connection.events

        def checked_events():
            for event in events():
                if isinstance(event, CloseConnection) and connection.state == ConnectionState.OPEN:
                    # a frame wsproto refused: stop here and tell the peer why
                    raise _SendClose(event)
                else:
                    yield event

        connection.events = checked_events
        try:
            await original(self)
        except _SendClose as close:
            await self._send_wsproto_event(CloseConnection(code=close.event.code, reason=close.event.reason))
            await self.send(ws_stream.StreamClosed(stream_id=self.stream_id))
        finally:
            del connection.events

    cls._handle_events = _handle_events
    _stop_pings_on_close(cls)
    setattr(cls, _MARK, True)


def _stop_pings_on_close(cls: Any) -> None:
    send_pings = cls._send_pings

    async def _send_pings(self: Any) -> None:
        with trio.CancelScope() as scope:
            self.__dict__[_PING_SCOPE] = scope
            if not self.closed:
                await send_pings(self)

    cls._send_pings = _send_pings
    cls.closed = _ClosedStopsPings()


class _ClosedStopsPings:
    """``WSStream.closed``, stored per instance; setting it true cancels the
    stream's ping loop."""

    def __get__(self, stream: Any, owner: Any = None) -> Any:
        return self if stream is None else stream.__dict__.get(_CLOSED, False)

    def __set__(self, stream: Any, value: bool) -> None:
        stream.__dict__[_CLOSED] = value
        if value and (scope := stream.__dict__.get(_PING_SCOPE)) is not None:
            scope.cancel()


class _SendClose(Exception):
    def __init__(self, event: CloseConnection) -> None:
        self.event = event
