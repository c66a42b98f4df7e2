"""One narrow fix to hypercorn, applied when a server starts.

When a client sends a frame wsproto cannot accept (a text message that is not
valid UTF-8, a protocol violation), wsproto reports it as a
``CloseConnection`` with the right code (1007, 1002) while the connection is
still open. Hypercorn 0.17-0.18 answers close frames only in the
REMOTE_CLOSING state, so it drops the TCP connection without telling the
client why, and the client sees 1006. The protocol promises 1007. This wraps
``WSStream._handle_events`` so that such a close is sent to the peer first;
everything else is left to hypercorn. ``tests/test_isolation.py`` checks the
1007 end to end, so a hypercorn that changes this code path is noticed.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import ws_stream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

_MARK = "_netra_sends_parse_failures"


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
    setattr(cls, _MARK, True)


class _SendClose(Exception):
    def __init__(self, event: CloseConnection) -> None:
        self.event = event
