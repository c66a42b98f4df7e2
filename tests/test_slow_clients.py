"""Clients that stop reading, or never finish speaking, on real sockets:
every socket the server holds has a deadline, whatever it speaks, and a
client released leaves no file descriptor, task or buffer behind."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from netra.testing import config_for_tests, open_server, token_for
from tests.conftest import netra_tasks
from tests.rawws import OP_PING, OP_TEXT, open_raw

WRITE, CLOSE = 0.5, 0.5


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def released(server, *, baseline: int, within: float) -> float:
    """Wait until the server holds ``baseline`` sockets again; how long it took."""
    began = trio.current_time()
    with trio.fail_after(within):
        while server.listener.open_connections > baseline or netra_tasks():
            await trio.sleep(0.02)
    return trio.current_time() - began


@pytest.mark.parametrize("authenticated", [True, False])
async def test_a_ping_flood_that_never_reads_is_released(authenticated):
    """Each ping owes a pong; one that reads none of them fills its socket.
    Pongs wait one at a time, and the write deadline releases it."""
    config = config_for_tests(write_timeout_s=WRITE, close_timeout_s=CLOSE, auth_timeout_s=30)
    async with open_server(config) as server:
        before = fds()
        raw = await open_raw(server.ws_url, token_for(server, "pinger") if authenticated else None, rcvbuf=4096)
        if authenticated:
            await raw.read_event()
        stopped_at = None
        with trio.fail_after(30):
            try:
                while True:
                    await raw.send_frame(OP_PING, b"p" * 125)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                stopped_at = trio.current_time()  # the server cut it
        took = await released(server, baseline=0, within=WRITE + CLOSE + 5)
        assert stopped_at is not None and took < WRITE + CLOSE + 2
        await raw.stream.aclose()
        assert fds() <= before


async def test_pipelined_http_without_reading_is_cut_at_the_write_deadline():
    """A client that pipelines requests and reads no response: hypercorn's
    writes block, netra's deadline under them cuts the connection, and the
    socket and its tasks are let go."""
    config = config_for_tests(write_timeout_s=WRITE, close_timeout_s=CLOSE)
    async with open_server(config) as server:
        before = fds()
        host, port = server.listener.address
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        request = f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with trio.fail_after(30):
            try:
                while True:
                    await sock.send(request * 50)
            except OSError:
                pass  # reset by the server
        await released(server, baseline=0, within=WRITE + CLOSE + 5)
        assert server.hub.metrics.http_write_aborts._value.get() >= 1
        sock.close()
        with trio.fail_after(5):
            while fds() > before:
                await trio.sleep(0.02)


async def test_pipelined_http_then_closing_leaves_nothing_behind():
    """Pipelining until the writes block, then closing without reading:
    the failed write ends hypercorn's handler of that connection too."""
    config = config_for_tests(write_timeout_s=30, close_timeout_s=CLOSE)
    async with open_server(config) as server:
        before = fds()
        host, port = server.listener.address
        for _ in range(3):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, port))
            request = f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            with trio.move_on_after(1):
                while True:  # until the server stops reading: its responses are stuck
                    await sock.send(request * 50)
            sock.close()  # unread responses: the server's next write is reset
        took = await released(server, baseline=0, within=10)
        assert took < 5  # not the 30 s write deadline: the reset ends it
        with trio.fail_after(5):
            while fds() > before:
                await trio.sleep(0.02)


async def test_a_request_head_that_never_ends_is_dropped_at_the_handshake_timeout():
    config = config_for_tests(handshake_timeout_s=0.5)
    async with open_server(config) as server:
        host, port = server.listener.address
        for first in (b"GET /ws HTTP/1.1\r\nHost: x\r\n", b"GE"):
            sock = trio.socket.socket()
            await sock.connect((host, port))
            await sock.send(first)
            with trio.fail_after(5):
                answer = await sock.recv(1024)
                while (more := await sock.recv(1024)):
                    answer += more
            if first.startswith(b"GET /ws"):
                assert answer.startswith(b"HTTP/1.1 408 ")
            sock.close()
        await released(server, baseline=0, within=2)
        assert server.hub.metrics.connections_dropped.labels("handshake_timeout")._value.get() == 2


async def test_an_oversized_frame_is_refused_from_its_header_with_1009():
    async with open_server(config_for_tests(max_message_bytes=65536)) as server:
        raw = await open_raw(server.ws_url, token_for(server, "big"))
        await raw.read_event()
        # a header that announces 16 MiB, and not one byte of the payload
        await raw.stream.send_all(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 1 << 24) + os.urandom(4))
        with trio.fail_after(5):
            assert await raw.read_close_code() == 1009
        await raw.stream.aclose()
        await released(server, baseline=0, within=5)
        assert server.hub.metrics.connections_closed.labels("1009")._value.get() == 1


async def test_every_connection_counts_from_its_first_byte():
    """Sockets that have not authenticated, or speak HTTP, count against
    max_connections too: past it a connection gets 503 at once."""
    async with open_server(config_for_tests(max_connections=2, auth_timeout_s=30)) as server:
        host, port = server.listener.address
        idle = []
        for _ in range(2):
            raw = await open_raw(server.ws_url, None)  # upgraded, never authenticates
            idle.append(raw)
        sock = trio.socket.socket()
        await sock.connect((host, port))
        await sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            answer = await sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"busy"' in answer
        sock.close()
        for raw in idle:
            await raw.stream.aclose()
        await released(server, baseline=0, within=5)


async def test_a_text_message_before_auth_that_is_not_auth_closes_4401():
    async with open_server(config_for_tests()) as server:
        raw = await open_raw(server.ws_url, None)
        await raw.send_frame(OP_TEXT, b'{"type": "ping"}')
        with trio.fail_after(5):
            assert await raw.read_close_code() == 4401
        await raw.stream.aclose()


async def test_websocket_sockets_have_a_bounded_kernel_send_buffer():
    """What the kernel holds for a client counts as taken: a fixed buffer
    bounds how much a client that stops reading can swallow before its
    write deadline starts (the system's autotuning grows it to megabytes)."""
    async with open_server(config_for_tests(send_buffer_bytes=65536)) as server:
        raw = await open_raw(server.ws_url, token_for(server, "buf"))
        await raw.read_event()
        [session] = server.hub.sessions
        size = session.transport._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert 65536 <= size <= 2 * 65536  # Linux reports twice what was set
        await raw.stream.aclose()
