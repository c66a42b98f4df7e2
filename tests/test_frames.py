"""netra's WebSocket framing and handshake, as the pure functions they are:
property-based over what a client can send, and checked against wsproto
(the framing hypercorn uses) as an independent implementation."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from netra.transport.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    ProtocolError,
    close_frame,
    text_frames,
)
from netra.transport.handshake import HandshakeError, accept_response, is_upgrade_path, parse_upgrade

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0) -> bytes:
    """A frame as a client sends it: masked."""
    mask = mask if mask is not None else os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def decode_all(decoder: FrameDecoder, data: bytes, chunks: list[int]) -> list[tuple[int, object]]:
    out = []
    pos = 0
    for size in [*chunks, len(data)]:
        decoder.feed(data[pos:pos + size])
        pos += size
        while (item := decoder.next()) is not None:
            out.append(item)
        if pos >= len(data):
            break
    return out


# -- messages survive any fragmentation and any way the bytes arrive -------------

message = st.one_of(
    st.tuples(st.just(OP_TEXT), st.text(max_size=300)),
    st.tuples(st.just(OP_BINARY), st.binary(max_size=300)),
)


@SETTINGS
@given(
    messages=st.lists(message, max_size=8),
    fragments=st.lists(st.integers(1, 4), min_size=8, max_size=8),
    pings=st.lists(st.booleans(), min_size=8, max_size=8),
    chunks=st.lists(st.integers(1, 50), max_size=40),
)
def test_messages_round_trip_through_fragments_control_frames_and_chunking(messages, fragments, pings, chunks):
    wire = b""
    for (op, content), parts, ping in zip(messages, fragments, pings, strict=False):
        payload = content.encode("utf-8") if op == OP_TEXT else content
        size = max(1, -(-len(payload) // parts))
        pieces = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
        for i, piece in enumerate(pieces):
            wire += client_frame(op if i == 0 else 0, piece, fin=i == len(pieces) - 1)
            if ping and i == 0 and len(pieces) > 1:  # a control frame between fragments is allowed
                wire += client_frame(OP_PING, b"hi")
    decoded = decode_all(FrameDecoder(1 << 20), wire, chunks)
    data = [(op, payload) for op, payload in decoded if op in (OP_TEXT, OP_BINARY)]
    assert data == [(op, content) for op, content in messages]
    assert all(payload == b"hi" for op, payload in decoded if op == OP_PING)


@SETTINGS
@given(st.binary(max_size=400), st.integers(16, 256))
def test_any_bytes_give_messages_or_a_protocol_error_and_nothing_else(data, limit):
    decoder = FrameDecoder(limit)
    decoder.feed(data)
    try:
        while (item := decoder.next()) is not None:
            op, payload = item
            if op == OP_TEXT:
                assert isinstance(payload, str) and len(payload.encode()) <= limit
            elif op in (OP_BINARY, OP_PING, OP_PONG):
                assert isinstance(payload, bytes)
            else:
                assert op == OP_CLOSE
    except ProtocolError as exc:
        assert exc.code in (1002, 1007, 1009)


def test_an_oversized_frame_is_refused_from_its_header_alone():
    decoder = FrameDecoder(65536)
    decoder.feed(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 1 << 20))  # 10 bytes: no mask, no payload
    with pytest.raises(ProtocolError) as refused:
        decoder.next()
    assert refused.value.code == 1009
    fragmented = FrameDecoder(100)
    fragmented.feed(client_frame(OP_TEXT, b"x" * 60, fin=False) + bytes((0x00, 0x80 | 60)))
    with pytest.raises(ProtocolError) as refused:
        while fragmented.next() is not None:
            pass
    assert refused.value.code == 1009


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes((0x81, 0x02)) + b"hi", 1002),  # not masked
        (client_frame(OP_TEXT, b"hi", rsv=0x40), 1002),  # a reserved bit (no extension)
        (client_frame(OP_PING, b"x", fin=False), 1002),  # a fragmented control frame
        (client_frame(OP_PING, b"x" * 126), 1002),  # a control frame too long
        (client_frame(0x3, b""), 1002),  # an unknown opcode
        (client_frame(0x0, b"x"), 1002),  # a continuation outside a message
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (client_frame(OP_CLOSE, b"\x03"), 1002),  # a one-byte close body
        (client_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),  # a code no peer may send
        (client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
)
def test_framing_violations_carry_their_close_code(wire, code):
    decoder = FrameDecoder(65536)
    decoder.feed(wire)
    with pytest.raises(ProtocolError) as refused:
        while decoder.next() is not None:
            pass
    assert refused.value.code == code


def test_close_frames_decode_with_their_code():
    decoder = FrameDecoder(1000)
    decoder.feed(client_frame(OP_CLOSE, struct.pack("!H", 4000) + "bye ✓".encode()) + client_frame(OP_CLOSE, b""))
    assert decoder.next() == (OP_CLOSE, (4000, "bye ✓"))
    assert decoder.next() == (OP_CLOSE, (1005, ""))


# -- what netra sends, read back by wsproto ------------------------------------------


@SETTINGS
@given(st.lists(st.text(max_size=70000).map(lambda t: t.encode()), min_size=1, max_size=5))
def test_server_frames_read_back_by_wsproto(payloads):
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(text_frames(payloads))
    got = []
    for frame in reader.received_frames():
        assert frame.opcode is Opcode.TEXT and frame.message_finished
        got.append(frame.payload.encode())
    assert got == payloads


@pytest.mark.parametrize("reason", ["", "bye", "é" * 100])
def test_close_frames_read_back_by_wsproto(reason):
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(close_frame(4430, reason))
    [frame] = list(reader.received_frames())
    assert frame.opcode is Opcode.CLOSE and frame.payload[0] == 4430
    assert len(frame.payload[1].encode()) <= 123 and reason.startswith(frame.payload[1])


# -- the opening handshake -----------------------------------------------------------


def upgrade(*extra: str, first: str = "GET /ws HTTP/1.1", key: str = "dGhlIHNhbXBsZSBub25jZQ==") -> bytes:
    lines = [first, "Host: example", "Upgrade: websocket", "Connection: keep-alive, Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_the_rfc_example_handshake():
    request = parse_upgrade(upgrade("Sec-WebSocket-Protocol: chat, netra.v1", "Origin: http://example"))
    assert request.path == "/ws" and request.subprotocols == ("chat", "netra.v1")
    assert request.header(b"origin") == "http://example"
    response = accept_response(request.key, "netra.v1")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response  # RFC 6455 section 1.3
    assert response.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Protocol: netra.v1" in response


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (upgrade(key="short"), 400),
        (upgrade().replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
        (upgrade().replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426),
        (upgrade("Content-Length: 5"), 400),
        (upgrade(first="GET /ws HTTP/1.0"), 400),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    ],
)
def test_bad_upgrades_are_refused_with_a_status(head, status):
    with pytest.raises(HandshakeError) as refused:
        parse_upgrade(head)
    assert refused.value.status == status


@SETTINGS
@given(st.binary(max_size=600))
def test_any_request_head_is_an_upgrade_or_a_handshake_error(data):
    try:
        request = parse_upgrade(data + b"\r\n\r\n")
    except HandshakeError as exc:
        assert 400 <= exc.status < 500
    else:
        assert len(request.key) == 24


@pytest.mark.parametrize(
    ("line", "ours"),
    [(b"GET /ws HTTP/1.1", True), (b"GET /ws?x=1 HTTP/1.1", True), (b"GET /wsx HTTP/1.1", False),
     (b"POST /ws HTTP/1.1", False), (b"GET / HTTP/1.1", False), (b"GET /api/threads HTTP/1.1", False)],
)
def test_only_get_ws_is_netras_own(line, ours):
    assert is_upgrade_path(line, b"/ws") is ours
