"""A raw WebSocket client over a real TCP socket, for what polite clients
never do: send invalid UTF-8 or oversized frames, stop reading, vanish
without FIN, or reset the connection mid-stream."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from urllib.parse import urlsplit

import attrs
import trio

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@attrs.define(eq=False)
class RawClient:
    stream: trio.SocketStream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.stream.send_all(header + mask + masked)

    async def send_json(self, obj: dict) -> None:
        await self.send_frame(OP_TEXT, json.dumps(obj).encode())

    async def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("connection closed by the server")
            self.buffer += data

    async def read_frame(self) -> tuple[int, bytes]:
        await self._fill(2)
        opcode = self.buffer[0] & 0x0F
        n = self.buffer[1] & 0x7F
        offset = 2
        if n == 126:
            await self._fill(4)
            n = struct.unpack("!H", self.buffer[2:4])[0]
            offset = 4
        elif n == 127:
            await self._fill(10)
            n = struct.unpack("!Q", self.buffer[2:10])[0]
            offset = 10
        await self._fill(offset + n)
        payload = bytes(self.buffer[offset : offset + n])
        del self.buffer[: offset + n]
        return opcode, payload

    async def read_event(self) -> dict:
        """The next text frame as JSON (answering pings on the way)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_TEXT:
                return json.loads(payload)
            if opcode == OP_PING:
                await self.send_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                raise ClosedByServer(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)

    async def read_close_code(self) -> int | None:
        """Read until the server's close frame; its code (None: TCP ended first)."""
        try:
            while True:
                await self.read_event()
        except ClosedByServer as closed:
            return closed.code
        except (EOFError, trio.BrokenResourceError, ConnectionResetError):
            return None

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a crashed client does."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stream.socket.close()


class ClosedByServer(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed by server with {code}")
        self.code = code


async def open_raw(ws_url: str, token: str | None, *, rcvbuf: int | None = None) -> RawClient:
    parts = urlsplit(ws_url)
    sock = trio.socket.socket()
    if rcvbuf is not None:  # before connect, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {parts.path} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: netra.v1",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    client = RawClient(stream)
    while b"\r\n\r\n" not in client.buffer:
        await client._fill(len(client.buffer) + 1)
    head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise RuntimeError(f"upgrade refused: {head.split(b'\r\n')[0]!r}")
    client.buffer = bytearray(rest)
    return client
