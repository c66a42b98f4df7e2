"""The client's exception family: everything :mod:`netra.client` raises.

trio-websocket's and the socket layer's exceptions are translated into these
where the client calls them, and nowhere else, so a caller handles netra's
answers, not the transport's internals::

    ClientError
    ├── ServerUnreachable   no WebSocket: nothing listens, name unknown, no answer in time
    ├── ConnectionRefused   the server answered the upgrade with an HTTP error (401, 403, 503...)
    ├── ConnectionClosed    the WebSocket closed; ``code`` is the close code (4401, 1001...)
    ├── RunRefused          a message got an ``error`` event: no run started
    ├── DecisionRefused     a tool_decision got an ``error`` event: the call was not decided
    └── ProtocolError       the server sent something protocol v1 does not allow
"""

from __future__ import annotations

import json
from typing import Any


class ClientError(Exception):
    """Base of the client's errors."""


class ServerUnreachable(ClientError):
    """No WebSocket could be opened at ``url``: nothing listens there, the
    name does not resolve, the connection broke during the handshake, or no
    answer came within the connect timeout. Worth retrying with backoff."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"cannot reach {url}: {detail}")
        self.url = url
        self.detail = detail


class ConnectionRefused(ClientError):
    """The server refused the WebSocket upgrade with an HTTP error.

    ``status`` is the HTTP status (401 bad token, 403 origin not allowed,
    400 token in the query string, 503 draining); ``code`` and ``message``
    come from netra's JSON body (``code`` is one of the protocol's error
    codes, e.g. ``unauthorized``; None when the body was not netra's)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{status} {code or 'refused'}: {message}" if message else f"HTTP {status}")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_response(cls, status: int, body: bytes | None) -> ConnectionRefused:
        try:
            data: Any = json.loads(body or b"")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls(status, None, "")
        code, message = data.get("code"), data.get("message")
        return cls(
            status,
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else "",
        )


class ConnectionClosed(ClientError):
    """The connection ended; ``code`` is the WebSocket close code (None when
    none was received) and ``reason`` the close reason."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed ({code}: {reason})")
        self.code = code
        self.reason = reason


class RunRefused(ClientError):
    """The server answered the message with an ``error``: no run started."""

    def __init__(self, code: str, message: str, raw: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.raw = raw


class DecisionRefused(ClientError):
    """The server refused a ``tool_decision`` (:meth:`Connection.decide`):
    ``not_found`` when no call of this user waits with those ids (unknown,
    already decided, expired), ``bad_request`` when the edited arguments do
    not fit the tool (the call still waits: decide again)."""

    def __init__(self, code: str, message: str, raw: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.raw = raw


class ProtocolError(ClientError):
    """The server sent a frame protocol v1 does not allow (not a JSON event,
    a ``seq`` gap, no ``connected`` first)."""
