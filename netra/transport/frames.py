"""RFC 6455 framing, server side, as pure functions: bytes in, messages out;
payloads in, bytes out. No I/O happens here.

netra builds its own frames because a server sends far more than it receives
(about ten events per client message) and every microsecond per frame is
paid ten times per run: a text frame is a two-to-ten byte header in front of
a payload that is already UTF-8 JSON, and a batch of them is one
``bytes.join``. ``python -m bench framing`` measures this against wsproto and
the ``websockets`` package (see bench/README.md).

The decoder is strict where the RFC says MUST: client frames are masked,
reserved bits are clear, control frames are short and unfragmented, text is
valid UTF-8, close codes are ones a peer may send. Every violation raises
:class:`ProtocolError` carrying the close code to answer with (1002, 1007,
1009), like wsproto's ``RemoteProtocolError.event_hint``. A frame whose header
announces more than the message limit is refused from its header, before its
payload is read. Per-message compression is never negotiated.
"""

from __future__ import annotations

from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005
CLOSE_ABNORMAL: Final = 1006
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009


class ProtocolError(Exception):
    """The peer broke the framing rules; ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _header(opcode: int, length: int) -> bytes:
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def text_frames(payloads: list[bytes]) -> bytes:
    """One buffer of unmasked text frames, one per UTF-8 payload."""
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        n = len(payload)
        append(bytes((0x81, n)) if n < 126 else _header(OP_TEXT, n))
        append(payload)
    return b"".join(parts)


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    return _header(opcode, len(payload)) + payload[:125]


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; ``None`` sends one with no status (an echo of an empty close)."""
    if code is None:
        return _header(OP_CLOSE, 0)
    body = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
    # cutting the reason may split a character: keep only whole ones
    body = body[:2] + body[2:].decode("utf-8", "ignore").encode("utf-8")
    return _header(OP_CLOSE, len(body)) + body


def unmask(data: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    key = (bytes(mask) * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _valid_close_code(code: int) -> bool:
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


class FrameDecoder:
    """Turns the bytes a client sends into whole messages.

    :meth:`next` returns ``(opcode, payload)`` for each complete message:
    ``OP_TEXT`` with a ``str``, ``OP_BINARY``/``OP_PING``/``OP_PONG`` with
    ``bytes``, ``OP_CLOSE`` with ``(code, reason)`` (code 1005 when the close
    frame had none), or ``None`` when more bytes are needed."""

    __slots__ = ("_buf", "_max", "_frag_op", "_frag", "_frag_len")

    def __init__(self, max_message_bytes: int) -> None:
        self._buf = bytearray()
        self._max = max_message_bytes
        self._frag_op: int | None = None
        self._frag: list[bytes] = []
        self._frag_len = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next(self) -> tuple[int, object] | None:
        while True:
            buf = self._buf
            have = len(buf)
            if have < 2:
                return None
            b0, b1 = buf[0], buf[1]
            if b0 & 0x70:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
            if not b1 & 0x80:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            fin = b0 & 0x80
            op = b0 & 0x0F
            length = b1 & 0x7F
            pos = 2
            if length == 126:
                if have < 4:
                    return None
                length = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif length == 127:
                if have < 10:
                    return None
                length = int.from_bytes(buf[2:10], "big")
                if length >> 63:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
                pos = 10
            if op >= 0x8:
                if op > OP_PONG:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                if not fin or length > 125:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames are short and not fragmented")
            elif op == OP_CONTINUATION:
                if self._frag_op is None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
                if self._frag_len + length > self._max:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self._max} bytes")
            elif op in (OP_TEXT, OP_BINARY):
                if self._frag_op is not None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if length > self._max:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self._max} bytes")
            else:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
            end = pos + 4 + length
            if have < end:
                return None
            payload = unmask(buf[pos + 4:end], buf[pos:pos + 4])
            del buf[:end]
            if op >= 0x8:
                if op == OP_CLOSE:
                    return OP_CLOSE, _parse_close(payload)
                return op, payload
            if op != OP_CONTINUATION:
                if fin:
                    return op, _message(op, payload)
                self._frag_op, self._frag, self._frag_len = op, [payload], length
                continue
            self._frag.append(payload)
            self._frag_len += length
            if fin:
                first, parts = self._frag_op, self._frag
                self._frag_op, self._frag, self._frag_len = None, [], 0
                return first, _message(first, b"".join(parts))


def _message(op: int, payload: bytes) -> object:
    if op == OP_BINARY:
        return payload
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "text frame is not valid UTF-8") from None


def _parse_close(payload: bytes) -> tuple[int, str]:
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte body")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent by a peer")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason
