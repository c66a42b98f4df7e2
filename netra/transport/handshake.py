"""The WebSocket opening handshake, as pure functions: request head in,
:class:`UpgradeRequest` out; status and body in, response bytes out.

The request head is parsed by h11 (the HTTP/1.1 parser hypercorn itself is
built on), so netra's own path accepts exactly the requests the HTTP side
would; what h11 refuses is a 400 here too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final
from urllib.parse import unquote

import attrs
import h11
import orjson

#: The longest request head netra reads (request line plus headers).
MAX_HEAD_BYTES: Final = 16384

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_REASONS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class HandshakeError(Exception):
    """The request cannot be upgraded: answer ``status`` with ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


@attrs.frozen
class UpgradeRequest:
    path: str
    query: str
    headers: tuple[tuple[bytes, bytes], ...]
    key: bytes
    subprotocols: tuple[str, ...]

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


def is_upgrade_path(first_line: bytes, path: bytes) -> bool:
    """Whether a request line asks for ``GET path`` (with or without a query)."""
    prefix = b"GET " + path
    return first_line.startswith(prefix) and first_line[len(prefix):len(prefix) + 1] in (b" ", b"?")


def parse_upgrade(head: bytes) -> UpgradeRequest:
    """Parse and check a WebSocket upgrade request head (ending in a blank line)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        conn.receive_data(head)
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(400, "bad_request", f"malformed request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise HandshakeError(400, "bad_request", "incomplete request head")
    if event.http_version != b"1.1":
        raise HandshakeError(400, "bad_request", "WebSocket needs HTTP/1.1")
    headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
    values: dict[bytes, list[bytes]] = {}
    for k, v in headers:
        values.setdefault(k, []).append(v)
    if any(k in values for k in (b"content-length", b"transfer-encoding")):
        raise HandshakeError(400, "bad_request", "an upgrade request has no body")
    upgrade = b",".join(values.get(b"upgrade", [])).lower()
    connection = b",".join(values.get(b"connection", [])).lower()
    if b"websocket" not in [p.strip() for p in upgrade.split(b",")] or b"upgrade" not in [
        p.strip() for p in connection.split(b",")
    ]:
        raise HandshakeError(
            426, "bad_request", "this endpoint speaks WebSocket only",
            headers=((b"upgrade", b"websocket"), (b"connection", b"Upgrade")),
        )
    if values.get(b"sec-websocket-version") != [b"13"]:
        raise HandshakeError(
            426, "bad_request", "unsupported WebSocket version (13 is)",
            headers=((b"sec-websocket-version", b"13"),),
        )
    keys = values.get(b"sec-websocket-key", [])
    try:
        if len(keys) != 1 or len(base64.b64decode(keys[0], validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "bad_request", "missing or malformed Sec-WebSocket-Key") from None
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    protocols = tuple(
        p.strip().decode("latin-1")
        for v in values.get(b"sec-websocket-protocol", [])
        for p in v.split(b",")
        if p.strip()
    )
    return UpgradeRequest(path=unquote(path), query=query, headers=headers, key=keys[0], subprotocols=protocols)


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept,
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def error_response(
    status: int, code: str, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """A JSON error response that closes the connection (the body is the
    ``{"code", "message"}`` object every HTTP error of netra carries)."""
    body = orjson.dumps({"code": code, "message": message})
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}".encode(),
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
        *(k + b": " + v for k, v in headers),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body
