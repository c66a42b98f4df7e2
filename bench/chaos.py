"""``python -m bench chaos``: healthy users beside faulty ones.

Two phases against one netra server (started here with the chaos tools, or
``--target``):

1. ``baseline``: N healthy users, each sending M calculator messages one
   after another (the load bench's users, with all of its per-event checks:
   :func:`bench.load.run_scenario`);
2. ``chaos``: the same number of healthy users again, while a share of extra,
   faulty users (one fault kind each, in a loop, from a separate process)
   make tools fail, make tools hang past the tool timeout, cut their socket
   mid-run, stop reading a long stream, or flood pings past the rate limit.

Only the healthy users are judged. After each phase the bench waits (bounded)
until ``/readyz`` reports no connection, user, borrowed limiter token or
queued run, then scrapes ``/metrics`` and reads the server's VmRSS.

The faulty users speak raw WebSocket (wsproto over a trio socket), because a
slow reader needs a socket with a small receive buffer that it never reads,
and a disconnect must be able to cut the TCP connection with no close frame.

Fault worker protocol (like the load workers'), one line each on the worker's
stdout/stdin: ``READY {...}`` -> ``GO`` -> faults run until ``STOP`` ->
``RESULT {...}``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import random
import re
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from . import _servers
from ._client import SUBPROTOCOL, TERMINAL, mint_token
from ._servers import cpu_seconds, fd_count, http_get, machine_cpu, rss_mib, tcp_sockets
from .hotpath import netra_source
from .load import ROOT, LineReader, cpu_self, emit, percentile, run_scenario

FAULT_KINDS = ("tool_fail", "tool_hang", "disconnect", "slow_reader", "flood")

#: What each faulty user sends.
FAIL_TEXT = "chaos: make the tool fail [[tool:fail {}]]"
HANG_TEXT = "chaos: make the tool hang [[tool:hang {}]]"
SLEEP_TEXT = 'chaos: cut me mid-run [[tool:sleep {"ms": 500}]]'

TCP_ESTABLISHED = 1
TCP_INFO = getattr(socket, "TCP_INFO", 11)


def chaos_env(messages: int) -> dict[str, str]:
    """netra's settings for the chaos phase, unless the environment sets them.

    The tool timeout and the write timeout are short so a hang and a slow
    reader end within the phase. The rate limit is netra's own default
    (10/s, abuse limit 50) so a flood meets the real limiter, with a burst of
    at least ``messages`` + 10 so that a healthy user, who sends its next
    message the moment a run ends, is never refused for it."""
    return {
        "NETRA_TOOL_TIMEOUT_S": "1",
        "NETRA_WRITE_TIMEOUT_S": "2",
        "NETRA_CLOSE_TIMEOUT_S": "2",
        "NETRA_RATE_PER_S": "10",
        "NETRA_RATE_BURST": str(max(30, messages + 10)),
        "NETRA_RATE_ABUSE_LIMIT": "50",
    }


# --------------------------------------------------------------------------
# a raw WebSocket client


class Gone(Exception):
    """The connection can no longer send."""


class RawWS:
    """A minimal netra.v1 client over one trio socket, framed by wsproto.

    Unlike trio-websocket it reads only when asked (a slow reader never
    asks), and it can cut its socket with or without a TCP reset."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.stream = trio.SocketStream(sock)
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.events: deque[dict[str, Any]] = deque()
        self.my_runs: set[str] = set()
        self.close_code: int | None = None
        self.closed = False
        self.reset = False
        self.accepted = False
        #: False: text frames are only counted (a flooder reads thousands), not decoded.
        self.decode = True
        self.text_frames = 0
        self.rate_limited_frames = 0
        self._text: list[str] = []
        self._send_lock = trio.Lock()

    @classmethod
    async def open(cls, host: str, port: int, token: str, *, rcvbuf: int | None = None,
                   timeout_s: float = 10.0) -> RawWS:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
            with trio.fail_after(timeout_s):
                await sock.connect((host, port))
                ws = cls(sock)
                request = Request(host=f"{host}:{port}", target="/ws", subprotocols=[SUBPROTOCOL],
                                  extra_headers=[(b"authorization", f"Bearer {token}".encode())])
                await ws.stream.send_all(ws.conn.send(request))
                while not ws.accepted:
                    if ws.closed:
                        raise ConnectionError("closed during the handshake")
                    await ws._pump()
        except BaseException:
            sock.close()
            raise
        return ws

    async def _pump(self) -> None:
        """Read once from the socket and queue what it completes."""
        try:
            data = await self.stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed, self.reset = True, True
            return
        if not data:
            self.closed = True
            return
        self.conn.receive_data(data)
        for event in self.conn.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                raise ConnectionRefusedError(f"upgrade refused with HTTP {event.status_code}")
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text = "".join(self._text)
                    self._text.clear()
                    self.text_frames += 1
                    if self.decode:
                        self.events.append(json.loads(text))
                    elif '"rate_limited"' in text:
                        self.rate_limited_frames += 1
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                self.closed = True
                if self.conn.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_if_free(self.conn.send(event.response()))
            elif isinstance(event, Ping):
                await self._send_if_free(self.conn.send(event.response()))

    async def _send_if_free(self, data: bytes) -> None:
        """Control replies from the reading task: never wait behind a sender
        blocked on a full socket (the flood's), just skip them."""
        if self._send_lock.locked():
            return
        async with self._send_lock:
            try:
                with trio.move_on_after(1):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def next_event(self) -> dict[str, Any] | None:
        """The next server event, or None once the connection is closed."""
        while not self.events:
            if self.closed:
                return None
            await self._pump()
        return self.events.popleft()

    async def send_json(self, *messages: dict[str, Any]) -> None:
        await self.send_frames(b"".join(self.conn.send(TextMessage(data=json.dumps(m))) for m in messages))

    async def send_frames(self, data: bytes) -> None:
        """Send frames already encoded by ``self.conn`` (a flooder reuses one batch)."""
        if self.closed or self.conn.state != ConnectionState.OPEN:
            raise Gone
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = self.reset = True
                raise Gone from exc

    def unread_bytes(self) -> int:
        """Bytes waiting in our socket's receive queue (FIONREAD), unread."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return -1

    def tcp_state(self) -> int:
        """The kernel's TCP state of our socket (1 = established, 7 = closed
        by a reset, 8 = close-wait: the peer sent FIN), read without reading
        any data."""
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 8)[0]
        except OSError:
            return 0

    async def aclose(self) -> None:
        """A polite close (close frame, then the socket), bounded."""
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            if self.conn.state == ConnectionState.OPEN and not self.closed:
                try:
                    await self._send_if_free(self.conn.send(CloseConnection(code=1000)))
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
        await self.abort(rst=False)

    async def abort(self, *, rst: bool) -> None:
        """Cut the connection with no close frame: FIN, or a reset (SO_LINGER 0)."""
        if rst:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.closed = True
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# --------------------------------------------------------------------------
# faulty users (worker process)


class Stats:
    """Per fault kind: counters and raw samples (merged by the parent)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def inc(self, kind: str, key: str, n: int = 1) -> None:
        if n:
            self.counts[kind][key] += n

    def sample(self, kind: str, key: str, value: float) -> None:
        self.samples[kind][key].append(round(value, 4))

    def to_json(self) -> dict[str, Any]:
        return {"counts": {k: dict(v) for k, v in self.counts.items()},
                "samples": {k: {s: v for s, v in d.items()} for k, d in self.samples.items()}}


class FaultCtx:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.host, self.port = spec["host"], spec["port"]
        self.secret = os.environ["NETRA_JWT_SECRET"]
        self.stats = Stats()
        self.stop = trio.Event()
        self.pause_s = spec["pause_ms"] / 1000
        self.bound_s = spec["write_timeout_s"] + spec["close_timeout_s"]
        #: client port -> [the server's send queue to it (bytes), when it last grew (perf_counter)]
        self.sndq: dict[int, list[float]] = {}

    async def watch_send_queues(self, interval_s: float = 0.1) -> None:
        """The server's side of each watched connection (a slow reader's):
        its send queue (tx_queue of /proc/net/tcp: bytes written by the
        server that the client has not acknowledged), and when it last grew.
        netra's write deadline starts when the kernel stops taking its
        writes, i.e. when that queue stops growing: the kernel takes up to
        net.ipv4.tcp_wmem's maximum (4 MiB here) first."""
        local = f":{self.port:04X}"
        while True:
            await trio.sleep(interval_s)
            if not self.sndq:
                continue
            try:
                with open("/proc/net/tcp") as f:
                    lines = f.readlines()
            except OSError:
                continue
            now = time.perf_counter()
            for line in lines:
                fields = line.split()
                if len(fields) < 5 or not fields[1].endswith(local):
                    continue
                watched = self.sndq.get(int(fields[2].rsplit(":", 1)[1], 16))
                if watched is not None:
                    tx = int(fields[4].split(":")[0], 16)
                    if tx > watched[0]:
                        watched[0], watched[1] = tx, now

    async def open(self, kind: str, sub: str, *, rcvbuf: int | None = None,
                   read_connected: bool = True) -> RawWS | None:
        """Connect as ``sub``; None (counted) when the server refused or failed."""
        try:
            ws = await RawWS.open(self.host, self.port, mint_token(self.secret, sub), rcvbuf=rcvbuf,
                                  timeout_s=self.spec["connect_timeout_s"])
            if read_connected:
                with trio.fail_after(self.spec["connect_timeout_s"]):
                    first = await ws.next_event()
                if first is None or first.get("type") != "connected":
                    self.stats.inc(kind, "first_frame_not_connected")
                elif first.get("user_id") not in (None, sub):
                    self.stats.inc(kind, "cross_user_events")
        except Exception as exc:  # noqa: BLE001 - counted by kind; the loop backs off and retries
            self.stats.inc(kind, f"connect_failed:{type(exc).__name__}")
            return None
        self.stats.inc(kind, "connections")
        return ws


async def _follow_run(ws: RawWS, mid: str, timeout_s: float, *, cut_at: str | None = None) -> dict[str, Any]:
    """Read the events of the run answering message ``mid`` until its terminal
    event (or until an event of type ``cut_at``, for the disconnect fault)."""
    out: dict[str, Any] = {"end": None, "code": None, "run_id": None, "tool_errors": 0, "tool_ok": 0,
                           "tool_ms": [], "cross_user": 0, "after_terminal": 0, "error_texts": []}
    started: dict[Any, float] = {}
    with trio.move_on_after(timeout_s) as scope:
        while True:
            event = await ws.next_event()
            if event is None:
                out["end"] = "connection_closed"
                break
            kind, rid = event.get("type"), event.get("run_id")
            if kind == "error":
                if event.get("ref") == mid:
                    out["end"], out["code"] = "error", event.get("code")
                    break
                continue
            if rid is None:
                continue
            if rid != out["run_id"]:
                if out["run_id"] is None and kind in ("run_queued", "agent_started") and event.get("ref") in (None, mid):
                    out["run_id"] = rid
                    ws.my_runs.add(rid)
                elif rid in ws.my_runs:
                    out["after_terminal"] += 1
                    continue
                else:
                    out["cross_user"] += 1
                    continue
            if kind == "tool_executing":
                started[event.get("tool_call_id")] = time.perf_counter()
            elif kind == "tool_completed":
                if event.get("error") is not None:
                    out["tool_errors"] += 1
                    out["error_texts"].append(str(event.get("error"))[:60])
                else:
                    out["tool_ok"] += 1
                t = started.pop(event.get("tool_call_id"), None)
                if t is not None:
                    out["tool_ms"].append((time.perf_counter() - t) * 1000)
            if kind == cut_at:
                out["end"] = "cut_point"
                break
            if kind in TERMINAL:
                out["end"], out["code"] = kind, event.get("code") or event.get("reason")
                break
    if scope.cancelled_caught:
        out["end"] = "timeout"
    return out


async def _tool_loop(ctx: FaultCtx, kind: str, sub: str, text: str) -> None:
    """tool_fail / tool_hang: one connection, one failing run after another."""
    st = ctx.stats
    ws: RawWS | None = None
    k = 0
    try:
        while not ctx.stop.is_set():
            if ws is None or ws.closed:
                if ws is not None:
                    st.inc(kind, f"disconnected:{ws.close_code}")
                    await ws.abort(rst=False)
                ws = await ctx.open(kind, sub)
                if ws is None:
                    await trio.sleep(1.0)
                    continue
            k += 1
            mid = f"{sub}-m{k}"
            try:
                await ws.send_json({"type": "user_message", "id": mid, "text": text})
            except Gone:
                continue
            st.inc(kind, "injected")
            r = await _follow_run(ws, mid, ctx.spec["run_timeout_s"])
            st.inc(kind, f"end:{r['end']}" + (f":{r['code']}" if r["code"] else ""))
            st.inc(kind, "tool_errors_seen", r["tool_errors"])
            st.inc(kind, "tool_results_ok", r["tool_ok"])
            st.inc(kind, "cross_user_events", r["cross_user"])
            st.inc(kind, "events_after_terminal", r["after_terminal"])
            for text_ in r["error_texts"][:1]:
                st.inc(kind, f"tool_error:{re.sub(r'[0-9.]+', 'N', text_)}")
            for ms in r["tool_ms"]:
                st.sample(kind, "tool_ms", ms)
            if r["end"] == "timeout":  # a run that never ended: give up this connection
                await ws.abort(rst=False)
                ws = None
            await trio.sleep(ctx.pause_s)
    finally:
        if ws is not None:
            await ws.aclose()


async def _disconnect_loop(ctx: FaultCtx, kind: str, sub: str) -> None:
    """Start a run calling ``sleep`` 500 ms, cut the socket while the tool
    runs (no close frame; a TCP reset every other time), reconnect."""
    st = ctx.stats
    cycle = 0
    rng = random.Random(sub)
    while not ctx.stop.is_set():
        ws = await ctx.open(kind, sub)
        if ws is None:
            await trio.sleep(1.0)
            continue
        cycle += 1
        mid = f"{sub}-m{cycle}"
        try:
            await ws.send_json({"type": "user_message", "id": mid, "text": SLEEP_TEXT})
            r = await _follow_run(ws, mid, ctx.spec["run_timeout_s"], cut_at="tool_executing")
            st.inc(kind, "cross_user_events", r["cross_user"])
            if r["end"] == "cut_point":
                await trio.sleep(rng.uniform(0.05, 0.3))  # inside the 500 ms tool call
                rst = cycle % 2 == 0
                await ws.abort(rst=rst)
                st.inc(kind, "injected")
                st.inc(kind, "cut_with_reset" if rst else "cut_with_fin")
            else:
                st.inc(kind, f"not_cut:{r['end']}" + (f":{r['code']}" if r["code"] else ""))
        except Gone:
            st.inc(kind, "not_cut:send_failed")
        finally:
            if not ws.closed:
                await ws.aclose()
        await trio.sleep(ctx.pause_s)


async def _slow_reader_loop(ctx: FaultCtx, kind: str, sub: str) -> None:
    """A small receive buffer, a long stream asked for and never read. The
    server must close within write_timeout + close_timeout of the moment its
    kernel stopped taking its writes to us (``sndq_full_s``: when the
    server's send queue to us last grew, from /proc/net/tcp). We learn when
    it closed without reading: a small ping every 250 ms draws a TCP reset
    once the server has closed its socket, and TCP_INFO then shows our
    socket leaving ESTABLISHED. We also note when our receive queue last grew
    (the server could push no more to us): ``rx_full_s``."""
    st = ctx.stats
    chunks = ctx.spec["stream_chunks"]
    observe_s = ctx.spec["slow_observe_s"]
    cycle = 0
    while not ctx.stop.is_set():
        ws = await ctx.open(kind, sub, rcvbuf=ctx.spec["rcvbuf"], read_connected=False)
        if ws is None:
            await trio.sleep(1.0)
            continue
        cycle += 1
        closed_after: float | None = None
        how = "not_closed"
        port = ws.sock.getsockname()[1]
        watch = ctx.sndq[port] = [0, time.perf_counter()]
        try:
            await ws.send_json({"type": "user_message", "id": f"{sub}-m{cycle}",
                                "text": f"chaos: a long answer I will not read [[stream:{chunks}]]"})
            st.inc(kind, "injected")
            t0 = last_ping = rx_grew = time.perf_counter()
            pings = rx = 0
            while (now := time.perf_counter()) - t0 < observe_s:
                if (unread := ws.unread_bytes()) > rx:
                    rx, rx_grew = unread, now
                state = ws.tcp_state()
                if state != TCP_ESTABLISHED:
                    closed_after, how = now - t0, f"tcp_state_{state}"
                    break
                if now - last_ping >= 0.25:
                    last_ping = now
                    pings += 1
                    try:
                        with trio.move_on_after(0.5):
                            await ws.send_json({"type": "ping", "id": f"p{pings}"})
                    except Gone:
                        closed_after, how = time.perf_counter() - t0, "send_failed"
                        break
                await trio.sleep(0.05)
        except Gone:
            how = "send_failed_before_stream"
        finally:
            ctx.sndq.pop(port, None)
            await ws.abort(rst=True)
        st.inc(kind, f"how:{how}")
        if closed_after is None:
            st.inc(kind, f"not_closed_within_{observe_s:g}s")
        else:
            st.inc(kind, "closed_by_server")
            st.sample(kind, "close_s", closed_after)
            st.sample(kind, "rx_full_s", rx_grew - t0)
            full = max(0.0, watch[1] - t0)
            st.sample(kind, "sndq_full_s", full)
            st.sample(kind, "sndq_bytes", watch[0])
            st.sample(kind, "close_after_sndq_full_s", closed_after - full)
            if closed_after - full > ctx.bound_s + ctx.spec["slow_slack_s"]:
                st.inc(kind, "closed_late")
        await trio.sleep(ctx.pause_s)


async def _flood_loop(ctx: FaultCtx, kind: str, sub: str) -> None:
    """Pings as fast as the socket takes them, far above the rate limit,
    until the server closes (4429 expected); then back off and reconnect.
    What comes back is counted, not decoded, so that the flooder can keep
    reading: a flooder that stops reading is closed 4430 instead."""
    st = ctx.stats
    while not ctx.stop.is_set():
        ws = await ctx.open(kind, sub)
        if ws is None:
            await trio.sleep(1.0)
            continue
        ws.decode = False
        st.inc(kind, "injected")
        batch = b"".join(ws.conn.send(TextMessage(data='{"type":"ping"}')) for _ in range(32))
        sent = 0
        t0 = time.perf_counter()
        t_closed: float | None = None

        async def reader(cancel: trio.CancelScope) -> None:
            nonlocal t_closed
            while not ws.closed:
                await ws._pump()
            t_closed = time.perf_counter()
            cancel.cancel()

        with trio.move_on_after(ctx.spec["flood_max_s"]):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, nursery.cancel_scope)
                try:
                    while True:
                        await ws.send_frames(batch)
                        sent += 32
                except Gone:
                    pass
                with trio.move_on_after(5):  # the sender stopped: let the reader see the close
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()
        ended, code = ws.closed, ws.close_code
        await ws.abort(rst=False)
        st.inc(kind, "frames_sent", sent)
        st.inc(kind, "frames_received", ws.text_frames)
        st.inc(kind, "rate_limited_seen", ws.rate_limited_frames)
        if not ended:
            st.inc(kind, f"still_open_after_{ctx.spec['flood_max_s']:g}s")
        elif code is not None:
            st.inc(kind, f"close:{code}")
            st.sample(kind, "s_to_close", (t_closed or time.perf_counter()) - t0)
            st.sample(kind, "frames_to_close", sent)
        else:  # the server cut the TCP connection without a close frame
            st.inc(kind, "cut_without_close_frame")
            st.sample(kind, "s_to_cut", (t_closed or time.perf_counter()) - t0)
        await trio.sleep(ctx.spec["flood_pause_ms"] / 1000)


_LOOPS = {
    "tool_fail": lambda ctx, kind, sub: _tool_loop(ctx, kind, sub, FAIL_TEXT),
    "tool_hang": lambda ctx, kind, sub: _tool_loop(ctx, kind, sub, HANG_TEXT),
    "disconnect": _disconnect_loop,
    "slow_reader": _slow_reader_loop,
    "flood": _flood_loop,
}


async def _worker(spec: dict[str, Any]) -> None:
    ctx = FaultCtx(spec)
    stdin = LineReader(trio.lowlevel.FdStream(os.dup(0)))
    users = [(kind, f"{spec['prefix']}-{kind}-u{n}") for kind, count in spec["mix"].items() for n in range(count)]
    emit("READY", {"users": len(users)})
    with trio.fail_after(spec["go_timeout_s"]):
        if (await stdin.readline()).strip() != "GO":
            raise RuntimeError("expected GO")
    cpu0, t0 = cpu_self(), time.monotonic()

    async def wait_stop() -> None:
        try:
            line = await stdin.readline()
        except EOFError:
            os._exit(3)  # the parent is gone: nobody is left to read our figures
        if line.strip() != "STOP":
            raise RuntimeError(f"expected STOP, got {line!r}")
        ctx.stop.set()

    async def one_user(kind: str, sub: str, delay: float) -> None:
        await trio.sleep(delay)  # spread the first connects over the first second
        await _LOOPS[kind](ctx, kind, sub)

    with trio.move_on_after(spec["deadline_s"]) as deadline:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_stop)
            nursery.start_soon(ctx.watch_send_queues)
            async with trio.open_nursery() as faults:
                for i, (kind, sub) in enumerate(users):
                    faults.start_soon(one_user, kind, sub, i / max(1, len(users)))
                await ctx.stop.wait()
                with trio.move_on_after(spec["stop_grace_s"]) as grace:  # let cycles in flight end
                    while faults.child_tasks:
                        await trio.sleep(0.05)
                if grace.cancelled_caught:
                    ctx.stats.inc("_worker", "cycles_cut_at_stop", len(faults.child_tasks))
                faults.cancel_scope.cancel()
            nursery.cancel_scope.cancel()  # the send-queue watch
    emit("RESULT", {"stats": ctx.stats.to_json(), "cpu_s": cpu_self() - cpu0, "wall_s": time.monotonic() - t0,
                     "deadline_hit": deadline.cancelled_caught})


# --------------------------------------------------------------------------
# parent side


async def _preflight(host: str, port: int, secret: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """One connection: the server's advertised limits, and proof that the
    chaos tools are there (a ``sleep`` call must succeed)."""
    ws = await RawWS.open(host, port, mint_token(secret, f"chaos-preflight-{os.getpid()}"), timeout_s=timeout_s)
    try:
        with trio.fail_after(timeout_s):
            first = await ws.next_event()
        if not first or first.get("type") != "connected":
            raise RuntimeError(f"first frame was {first!r}, not connected")
        await ws.send_json({"type": "user_message", "id": "preflight", "text": '[[tool:sleep {"ms": 1}]]'})
        r = await _follow_run(ws, "preflight", timeout_s)
        if r["end"] != "agent_completed" or r["tool_ok"] != 1:
            raise RuntimeError(f"the chaos tools are not there (start netra with NETRA_CHAOS_TOOLS=1): {r}")
        return first.get("limits") or {}
    finally:
        await ws.aclose()


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A parsed Prometheus text scrape: sum of samples by name and labels."""

    def __init__(self, text: str = "") -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m:
                try:
                    value = float(m.group(3))
                except ValueError:
                    continue
                self.samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))

    def get(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def by(self, name: str, *keys: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for n, lab, v in self.samples:
            if n == name:
                out[",".join(lab.get(k, "") for k in keys)] += v
        return dict(out)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in sorted(after.items()) if v - before.get(k, 0.0)}


async def _scrape(port: int) -> Metrics:
    status, body = await http_get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return Metrics(body.decode())


READY_COUNTS = ("connections", "users", "runs_borrowed", "model_borrowed", "tools_borrowed", "queued_runs")


async def _settle(port: int, timeout_s: float) -> dict[str, Any]:
    """Poll /readyz until every live count is 0 (bounded): what is left then."""
    t0 = time.monotonic()
    snap: dict[str, Any] = {}
    while True:
        try:
            _, body = await http_get(port, "/readyz")
            snap = json.loads(body)
        except (OSError, ValueError, trio.TooSlowError) as exc:
            snap = {"error": f"{type(exc).__name__}: {exc}"}
        if all(snap.get(k) == 0 for k in READY_COUNTS) or time.monotonic() - t0 > timeout_s:
            break
        await trio.sleep(0.2)
    leftover = {k: snap.get(k) for k in READY_COUNTS}
    return {"settled": all(v == 0 for v in leftover.values()), "settle_s": round(time.monotonic() - t0, 2),
            "leftover": leftover}


async def _fds(pid: int | None, target: int | None, wait_s: float = 5.0) -> int | None:
    """The server's open fds; with ``target``, wait (bounded) for the count to
    come back down to it (the scrapes' own sockets take a moment to close)."""
    deadline = time.monotonic() + wait_s
    while True:
        n = fd_count(pid)
        if n is None or target is None or n <= target or time.monotonic() > deadline:
            return n
        await trio.sleep(0.2)


async def _sample_lag(port: int, interval_s: float, out: list[float]) -> None:
    while True:
        await trio.sleep(interval_s)
        try:
            out.append((await _scrape(port)).get("netra_event_loop_lag_seconds"))
        except (OSError, RuntimeError, trio.TooSlowError, ValueError):
            pass


class FaultWorker:
    """The faulty users' process, driven by READY/GO/STOP/RESULT lines."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.spec, self.env = spec, env
        self.proc: trio.Process | None = None
        self.reader: LineReader | None = None

    async def start(self) -> None:
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.chaos", "--worker", json.dumps(self.spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, cwd=str(ROOT),
            **_servers.client_options(self.spec.get("nice", 0)))
        self.reader = LineReader(self.proc.stdout)
        with trio.fail_after(30):
            tag, _, _ = (await self.reader.readline()).partition(" ")
        if tag != "READY":
            raise RuntimeError(f"fault worker said {tag!r} instead of READY")
        await self.proc.stdin.send_all(b"GO\n")

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self.reader is not None
        await self.proc.stdin.send_all(b"STOP\n")
        with trio.fail_after(self.spec["stop_grace_s"] + 30):
            tag, _, body = (await self.reader.readline()).partition(" ")
        if tag != "RESULT":
            raise RuntimeError(f"fault worker said {tag!r} instead of RESULT")
        with trio.move_on_after(10):
            await self.proc.wait()
        return json.loads(body)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with trio.move_on_after(5):
                await self.proc.wait()


def _fault_mix(spec: str, faulty: int) -> dict[str, int]:
    """``tool_fail,flood`` or ``tool_fail=2,flood=1``: ``faulty`` users split
    by weight (largest remainders), every listed kind at least one user."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        if name not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(f"unknown fault {name!r} (use {', '.join(FAULT_KINDS)})")
        weights[name] = float(w) if w else 1.0
    if faulty <= 0 or not weights:
        return {}
    total = sum(weights.values())
    exact = {k: faulty * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: faulty - sum(counts.values())]:
        counts[k] += 1
    return {k: max(1, v) for k, v in counts.items()}


async def _phase(name: str, args: argparse.Namespace, *, url: str, port: int, secret: str,
                 pid: int | None, fault_spec: dict[str, Any] | None) -> dict[str, Any]:
    """One phase: healthy users (and faulty ones), then settle, scrape, RSS."""
    row: dict[str, Any] = {"phase": name}
    pre_settle = await _settle(port, args.settle_timeout)  # start from an idle server
    before = await _scrape(port)
    row["rss_mib_before"] = rss_mib(pid)
    row["fds_before"] = await _fds(pid, None)
    cpu0, machine0, t0 = cpu_seconds(pid), machine_cpu(), time.monotonic()
    lag: list[float] = []
    worker: FaultWorker | None = None
    env = {**os.environ, "NETRA_JWT_SECRET": secret,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sample_lag, port, args.lag_interval, lag)
            if fault_spec is not None:
                # fresh users per phase: a message id is accepted once per user (idempotency)
                worker = FaultWorker({**fault_spec, "prefix": f"{fault_spec['prefix']}-{name}"}, env)
                await worker.start()
                await trio.sleep(args.warmup)  # faults in full swing before the healthy users start
            healthy = await run_scenario(
                name=f"chaos-{name}", url=url, users=args.users, messages=args.messages, nice=args.nice,
                processes=args.processes, secret=secret, server_pid=pid, run_timeout_s=args.run_timeout,
                connect_concurrency=args.connect_concurrency, timeout_s=args.phase_timeout)
            if worker is not None:
                row["faults_raw"] = await worker.stop()
            nursery.cancel_scope.cancel()
    finally:
        if worker is not None:
            await worker.kill()
    cpu1, machine1, t1 = cpu_seconds(pid), machine_cpu(), time.monotonic()
    row["healthy"] = healthy
    settle = await _settle(port, args.settle_timeout)
    after = await _scrape(port)
    row["rss_mib_after"] = rss_mib(pid)
    t_fd = time.monotonic()
    row["fds_after_settle"] = fd_count(pid)
    row["tcp_sockets_after_settle"] = tcp_sockets(port)
    row["fds_after"] = await _fds(pid, row["fds_before"], args.fd_wait)  # hypercorn may hold a closed peer's socket a while
    row["fds_wait_s"] = round(time.monotonic() - t_fd, 1)
    row["tcp_sockets_after"] = tcp_sockets(port)
    busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
    row.update({
        "wall_s": round(t1 - t0, 2),
        "server_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
        "machine_busy": round(busy / total, 3) if total > 0 else None,
        "settle_before": pre_settle,
        "settle": settle,
        "loop_lag_s": {"max": round(max(lag), 4) if lag else None, "p50": percentile(lag, 50), "samples": len(lag)},
        "metrics_before": before,
        "metrics_after": after,
    })
    return row


def _mdelta(first: dict[str, Any], last: dict[str, Any], name: str, *keys: str) -> dict[str, float]:
    """How a counter moved from ``first``'s start to ``last``'s end, by labels."""
    return _delta(last["metrics_after"].by(name, *keys), first["metrics_before"].by(name, *keys))


def _merge_faults(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fault workers' stats of several chaos rounds, added up."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    cpu, deadline = 0.0, False
    for row in rows:
        raw = row.get("faults_raw") or {}
        for kind, c in raw.get("stats", {}).get("counts", {}).items():
            counts[kind].update(c)
        for kind, d in raw.get("stats", {}).get("samples", {}).items():
            for key, values in d.items():
                samples[kind][key].extend(values)
        cpu += raw.get("cpu_s", 0.0)
        deadline = deadline or bool(raw.get("deadline_hit"))
    return {"counts": counts, "samples": samples, "cpu_s": cpu, "deadline_hit": deadline}


def _fault_report(rows: list[dict[str, Any]], mix: dict[str, int], bound_s: float, slack_s: float) -> dict[str, Any]:
    """Per fault kind: what was injected, what the faulty clients saw, and
    what the server's metrics say it did (over all chaos rounds)."""
    merged = _merge_faults(rows)
    counts, samples = merged["counts"], merged["samples"]
    first, last = rows[0], rows[-1]
    tools = _mdelta(first, last, "netra_tool_calls_total", "tool", "outcome")
    runs = _mdelta(first, last, "netra_runs_finished_total", "outcome", "reason")
    closes = _mdelta(first, last, "netra_connections_closed_total", "code")
    bad = _mdelta(first, last, "netra_bad_frames_total", "code")

    def counter(name: str) -> float:
        return round(last["metrics_after"].get(name) - first["metrics_before"].get(name), 3)

    def pcts(kind: str, key: str) -> dict[str, Any]:
        values = samples.get(kind, {}).get(key, [])
        return {"p50": percentile(values, 50), "max": round(max(values), 3) if values else None, "n": len(values)}

    out: dict[str, Any] = {}
    for kind, users in mix.items():
        c = counts.get(kind, Counter())
        entry: dict[str, Any] = {"users": users, "injected": c.get("injected", 0),
                                 "client_saw": dict(sorted(c.items()))}
        if kind == "tool_fail":
            entry["server_did"] = {"tool_calls": {k: v for k, v in tools.items() if k.startswith("fail,")}}
        elif kind == "tool_hang":
            entry["server_did"] = {"tool_calls": {k: v for k, v in tools.items() if k.startswith("hang,")},
                                   "hang_to_tool_completed_ms": pcts(kind, "tool_ms")}
        elif kind == "disconnect":
            cancelled = runs.get("cancelled,disconnect", 0.0)
            # a slow consumer's run still going at the 4430 is cancelled with reason disconnect too (cause
            # slow_consumer); most slow readers' runs have ended by then, their events merged while behind
            slow = _mdelta(first, last, "netra_runs_failed_total", "cause").get("slow_consumer", 0.0)
            entry["server_did"] = {
                "runs_cancelled_disconnect": cancelled,
                "runs_cancelled_disconnect_minus_slow_consumers": round(cancelled - slow, 3),
                "tool_calls_sleep": {k: v for k, v in tools.items() if k.startswith("sleep,")},
            }
        elif kind == "slow_reader":
            after_full = sorted(samples.get(kind, {}).get("close_after_sndq_full_s", []))
            entry["server_did"] = {
                "slow_consumer_closes": counter("netra_slow_consumer_closes_total"),
                "transport_aborts": counter("netra_transport_aborts_total"),
                "closes_4430": closes.get("4430", 0.0),
                "close_s": pcts(kind, "close_s"),
                "rx_full_s": pcts(kind, "rx_full_s"),
                "sndq_full_s": pcts(kind, "sndq_full_s"),
                "sndq_bytes": pcts(kind, "sndq_bytes"),
                "close_after_sndq_full_s": pcts(kind, "close_after_sndq_full_s"),
                "bound_s": bound_s,
                "slack_s": slack_s,
                "closed_within_bound": sum(1 for v in after_full if v <= bound_s + slack_s),
                "close_after_sndq_full_s_all": [round(v, 2) for v in after_full][:100],
            }
        elif kind == "flood":
            entry["server_did"] = {
                "closes_4429_seen": c.get("close:4429", 0),
                "closes_4429_metric": closes.get("4429", 0.0),
                "still_open_at_bound": sum(v for k, v in c.items() if k.startswith("still_open_after_")),
                "cut_without_close_frame": c.get("cut_without_close_frame", 0),
                "rate_limited_frames": bad.get("rate_limited", 0.0),
                "s_to_close": pcts(kind, "s_to_close"),
                "frames_sent_to_close": pcts(kind, "frames_to_close"),
            }
        out[kind] = entry
    return out


def _targets(report: dict[str, Any], mix: dict[str, int]) -> dict[str, bool]:
    healthy = report["healthy"]
    t = {
        "healthy_completion_rate_is_1": all(h["completion_rate"] == 1.0 for h in healthy.values()),
        "cross_user_events_is_0": report["cross_user_events"] == 0,
        "isolation_violations_is_0": report["isolation_violations"] == 0,
        "runs_affected_is_0": not any(report["failure_containment"]["runs_affected"].values()),
        "leftover_is_0": all(v == 0 for ph in report["leftover"].values() for k, v in ph.items()
                             if k in READY_COUNTS),
    }
    if report["server_fds_leaked"] is not None:
        t["server_fds_back_to_start"] = report["server_fds_leaked"] <= 0
        t["no_server_held_tcp_sockets_left"] = not any(
            not k.startswith("orphan:") for ph in report["leftover"].values() for k in ph["server_tcp_sockets"])
    faults = report["faults"]
    if "slow_reader" in mix:
        f = faults["slow_reader"]
        t["slow_readers_closed_by_server"] = f["injected"] > 0 and f["client_saw"].get("closed_by_server", 0) == f["injected"]
        t["slow_readers_closed_within_bound"] = f["injected"] > 0 and f["server_did"]["closed_within_bound"] == f["injected"]
    if "flood" in mix:
        f = faults["flood"]
        # what the server decided, and what reached the client: a flooder that
        # has not read its backlog within close_timeout gets the socket cut
        t["floods_closed_4429_by_server"] = f["injected"] > 0 and f["server_did"]["closes_4429_metric"] == f["injected"]
        t["floods_saw_4429"] = f["injected"] > 0 and f["server_did"]["closes_4429_seen"] == f["injected"]
    if "tool_hang" in mix:
        f = faults["tool_hang"]
        t["hangs_became_failed_calls"] = f["injected"] > 0 and f["client_saw"].get("tool_errors_seen", 0) == f["injected"]
    if "tool_fail" in mix:
        f = faults["tool_fail"]
        t["fails_became_failed_calls"] = f["injected"] > 0 and f["client_saw"].get("tool_errors_seen", 0) == f["injected"]
    return t


def _healthy(row: dict[str, Any]) -> dict[str, Any]:
    h = row["healthy"]
    return {"runs_attempted": h["runs_attempted"], "runs_completed": h["runs_succeeded"],
            "completion_rate": h["success_rate"], "cross_user_events": h["cross_user_events"],
            "ttc_ms": h["ttc_ms"], "ttfe_ms": h["ttfe_ms"], "wall_s": h["wall_s"], "runs_per_s": h["runs_per_s"],
            "errors": h["errors"], "close_codes": h["close_codes"],
            "violations": {k: v for k, v in h["violations"].items() if v}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _report(args: argparse.Namespace, rows: dict[str, dict[str, Any]], mix: dict[str, int],
            limits: dict[str, Any], started: float, netra_env: dict[str, str], pid: int | None,
            bound_s: float) -> dict[str, Any]:
    chaos_rows = [r for name, r in rows.items() if name.startswith("chaos")]
    healthy = {ph: _healthy(r) for ph, r in rows.items()}
    hb, hc = healthy["baseline"], healthy["chaos"]
    attempted = sum(healthy[ph]["runs_attempted"] for ph in rows if ph.startswith("chaos"))
    completed = sum(healthy[ph]["runs_completed"] for ph in rows if ph.startswith("chaos"))
    merged = _merge_faults(chaos_rows) if mix else {"counts": {}, "cpu_s": 0.0}
    report: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "target": args.target,
            "server_pid": pid,
            "messages_per_user": args.messages,
            "chaos_rounds": args.rounds,
            "client_processes": args.processes,
            "fault_share": args.fault_share,
            "warmup_s": args.warmup,
            "fd_wait_s": args.fd_wait,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "git": _git_state(),
            "netra_source": netra_source(args.netra_root or ROOT) | (
                {"label": args.netra_label} if args.netra_label else {}),
            "nice": args.nice,
            "netra_env": netra_env,
            "server_limits": {k: limits.get(k) for k in ("tool_timeout_s", "write_timeout_s", "rate_per_s",
                                                          "rate_burst", "max_runs_per_user")},
        },
        "users": args.users,
        "faulty_users": sum(mix.values()),
        "fault_mix": mix,
        "healthy_runs_attempted": attempted,
        "healthy_runs_completed": completed,
        "healthy_completion_rate": round(completed / attempted, 4) if attempted else None,
        "cross_user_events": sum(h["cross_user_events"] for h in healthy.values()),
        "faulty_cross_user_events": sum(c.get("cross_user_events", 0) for c in merged["counts"].values()),
        "healthy_ttc_ms": {
            "baseline": hb["ttc_ms"], "chaos": hc["ttc_ms"],
            "ratio_chaos_over_baseline": {p: _ratio(hc["ttc_ms"][p], hb["ttc_ms"][p]) for p in ("p50", "p99")},
        },
        "healthy": healthy,
        "faults": _fault_report(chaos_rows, mix, bound_s, args.slow_slack) if mix else {},
        "leftover": {ph: {**r["settle"]["leftover"], "settle_s": r["settle"]["settle_s"],
                          "server_fds_before": r["fds_before"], "server_fds_after_settle": r["fds_after_settle"],
                          "server_tcp_sockets_after_settle": r["tcp_sockets_after_settle"],
                          "server_fds_after": r["fds_after"], "fd_wait_s": r["fds_wait_s"],
                          "server_tcp_sockets": r["tcp_sockets_after"]} for ph, r in rows.items()},
        "server_fds_leaked": (list(rows.values())[-1]["fds_after"] - rows["baseline"]["fds_before"]
                              if rows["baseline"]["fds_before"] is not None
                              and list(rows.values())[-1]["fds_after"] is not None else None),
        "isolation_violations": list(rows.values())[-1]["metrics_after"].get("netra_isolation_violations_total"),
        # runs that did not complete, charged to their own user, against runs
        # stopped by anything outside their user (netra_runs_affected_total)
        "failure_containment": {
            "runs_failed": _mdelta(rows["baseline"], list(rows.values())[-1], "netra_runs_failed_total", "cause"),
            "runs_affected": _mdelta(rows["baseline"], list(rows.values())[-1], "netra_runs_affected_total", "cause"),
        },
        "server_rss_mib": {},
        "cpu_s": {
            ph: {"client_healthy": r["healthy"]["client_cpu_s"],
                 "client_faulty": round((r.get("faults_raw") or {}).get("cpu_s", 0.0), 3),
                 "server_timed": r["healthy"]["server_cpu_s"], "server_phase": r["server_cpu_s"]}
            for ph, r in rows.items()},
        "machine_busy": {ph: {"timed": r["healthy"]["machine_busy"], "phase": r["machine_busy"],
                              "other_cpu_s": r["healthy"]["other_cpu_s"]} for ph, r in rows.items()},
        "client_bottleneck": {ph: r["healthy"]["client_bottleneck"] for ph, r in rows.items()},
        "event_loop_lag_s": {ph: r["loop_lag_s"] for ph, r in rows.items()},
        "server_metrics_delta": {
            ph: {"runs_finished": _mdelta(r, r, "netra_runs_finished_total", "outcome", "reason"),
                 "tool_calls": _mdelta(r, r, "netra_tool_calls_total", "tool", "outcome"),
                 "connections_closed": _mdelta(r, r, "netra_connections_closed_total", "code"),
                 "bad_frames": _mdelta(r, r, "netra_bad_frames_total", "code"),
                 "transport_aborts": _mdelta(r, r, "netra_transport_aborts_total").get("", 0.0),
                 "outbox_full": _mdelta(r, r, "netra_outbox_full_total").get("", 0.0)}
            for ph, r in rows.items()},
    }
    rss = report["server_rss_mib"]
    for ph, r in rows.items():
        before, after = (r["rss_mib_before"] or {}).get("rss"), (r["rss_mib_after"] or {}).get("rss")
        runs = sum(report["server_metrics_delta"][ph]["runs_finished"].values())
        drift = round(after - before, 1) if before is not None and after is not None else None
        rss[ph] = {"before": before, "after": after, "peak_after": (r["rss_mib_after"] or {}).get("hwm"),
                   "drift": drift, "runs_finished": runs,
                   "drift_kib_per_run": round(drift * 1024 / runs, 2) if drift is not None and runs else None}
    first, last = rss["baseline"]["before"], list(rss.values())[-1]["after"]
    rss["drift_total"] = round(last - first, 1) if first is not None and last is not None else None
    if merged.get("deadline_hit") or merged["counts"].get("_worker"):
        report["fault_worker"] = {"deadline_hit": merged.get("deadline_hit"), **merged["counts"].get("_worker", {})}
    report["targets"] = _targets(report, mix)
    report["targets_met"] = all(report["targets"].values())
    return report


def _git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.split("\n")
        return {"head": head, "dirty_files": sorted(line[3:] for line in dirty if line.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _left(leftover: dict[str, Any]) -> str:
    """'0', or the counts that did not return to 0."""
    bad = {k: v for k, v in leftover.items() if k in READY_COUNTS and v != 0}
    return json.dumps(bad, separators=(",", ":")) if bad else "0"


def _summary(report: dict[str, Any]) -> list[str]:
    lines = []
    for ph, h in report["healthy"].items():
        mb = report["machine_busy"][ph]
        cpu = report["cpu_s"][ph]
        lines.append(
            f"{ph:>8}: healthy {h['runs_completed']}/{h['runs_attempted']} ttc p50 {h['ttc_ms']['p50']} "
            f"p99 {h['ttc_ms']['p99']} ms  x-user {h['cross_user_events']}  cpu client {cpu['client_healthy']}"
            f"+{cpu['client_faulty']} s server {cpu['server_phase']} s  machine_busy {mb['timed']}  "
            f"leftover {_left(report['leftover'][ph])}  fds {report['leftover'][ph]['server_fds_before']} -> "
            f"{report['leftover'][ph]['server_fds_after']}  "
            f"rss {report['server_rss_mib'][ph]['before']} -> {report['server_rss_mib'][ph]['after']} MiB")
    r = report["healthy_ttc_ms"]["ratio_chaos_over_baseline"]
    lines.append(f"   ratio: chaos/baseline ttc p50 {r['p50']} p99 {r['p99']}")
    for kind, f in report["faults"].items():
        did = {k: v for k, v in f.get("server_did", {}).items()
               if k not in ("bound_s", "slack_s", "close_after_sndq_full_s_all")}
        lines.append(f"   fault {kind:<11} users {f['users']:>3} injected {f['injected']:>5}  server: "
                     f"{json.dumps(did, separators=(',', ':'))}")
    met = report["targets"]
    lines.append(f"  verdict: {'all targets met' if report['targets_met'] else 'MISSED: ' + ', '.join(k for k, v in met.items() if not v)}"
                 f"  isolation_violations {report['isolation_violations']}  "
                 f"runs failed {int(sum(report['failure_containment']['runs_failed'].values()))} "
                 f"{json.dumps(report['failure_containment']['runs_failed'], separators=(',', ':'))} "
                 f"other users' runs affected {int(sum(report['failure_containment']['runs_affected'].values()))}  "
                 f"rss drift {report['server_rss_mib']['drift_total']} MiB")
    return lines


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.splitlines()[0])
    p.add_argument("--target", metavar="URL", help="an already running netra (ws://127.0.0.1:P/ws) started with "
                   "NETRA_CHAOS_TOOLS=1; tokens are signed with $NETRA_JWT_SECRET")
    p.add_argument("--server-pid", type=int, help="with --target: read this process's CPU time and RSS")
    p.add_argument("--users", type=int, default=200, help="healthy users (default: 200)")
    p.add_argument("--messages", type=int, default=50, help="messages per healthy user and phase (default: 50)")
    p.add_argument("--fault-share", type=float, default=0.25,
                   help="faulty users as a share of --users, added in the chaos phase (default: 0.25)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help=f"fault kinds, optionally weighted (kind=w), default: {','.join(FAULT_KINDS)}")
    p.add_argument("--processes", type=int, default=2, help="healthy client processes (default: 2)")
    p.add_argument("--connect-concurrency", type=int, default=100, help="healthy connects in flight at once")
    p.add_argument("--run-timeout", type=float, default=60.0, help="seconds one healthy run may take")
    p.add_argument("--phase-timeout", type=float, default=600.0, help="seconds one healthy timed phase may take")
    p.add_argument("--rounds", type=int, default=1,
                   help="chaos phases run one after another on the same server (default: 1); more show "
                        "whether RSS keeps growing")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds the faults run before the healthy users start")
    p.add_argument("--settle-timeout", type=float, default=30.0, help="seconds to wait for /readyz counts to reach 0")
    p.add_argument("--fd-wait", type=float, default=None,
                   help="seconds to wait after settling for the server's open fds to come back to their count "
                        "before the phase (default: the server's heartbeat interval + 5)")
    p.add_argument("--fault-pause-ms", type=float, default=200.0, help="pause between two faults of one user")
    p.add_argument("--flood-pause-ms", type=float, default=1000.0, help="backoff of a flooder before reconnecting")
    p.add_argument("--flood-max-s", type=float, default=15.0,
                   help="longest one flood connection is kept up waiting for the server to close it")
    p.add_argument("--stream-chunks", type=int, default=20000, help="[[stream:N]] a slow reader asks for")
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of a slow reader's socket (bytes)")
    p.add_argument("--slow-observe", type=float, default=30.0,
                   help="longest a slow reader waits for the server to close it (s from its request)")
    p.add_argument("--slow-slack", type=float, default=1.0,
                   help="seconds past write_timeout + close_timeout still counted as in time")
    p.add_argument("--delay-ms", type=float, default=0.0, help="NETRA_SCRIPTED_DELAY_MS for the started server")
    p.add_argument("--lag-interval", type=float, default=1.0, help="seconds between event-loop-lag samples")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the started netra and of the client processes (and their autogroups), "
                        "e.g. -10 on a machine shared with other work (needs CAP_SYS_NICE; default 0)")
    p.add_argument("--netra-root", type=Path, default=None,
                   help="run the netra package of this source tree instead of this repository's")
    p.add_argument("--netra-label", help="what the measured netra is (e.g. the commit of an exported tree); "
                   "recorded in the JSON")
    p.add_argument("--json", metavar="PATH", help="also write the JSON here")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    args = p.parse_args(argv)
    if args.users < 1 or args.messages < 1 or args.processes < 1 or args.rounds < 1 or args.fault_share < 0:
        p.error("--users, --messages, --processes and --rounds must be >= 1, --fault-share >= 0")
    try:
        args.mix = _fault_mix(args.faults, round(args.users * args.fault_share))
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.target:
        if not args.target.startswith(("ws://127.", "ws://localhost")):
            p.error("--target must be a loopback ws:// URL")
        if not os.environ.get("NETRA_JWT_SECRET"):
            p.error("--target needs NETRA_JWT_SECRET (the key the server verifies tokens with)")
    elif args.server_pid:
        p.error("--server-pid goes with --target")
    if args.netra_root is not None:
        if args.target:
            p.error("--netra-root goes with a server the bench starts, not --target")
        args.netra_root = args.netra_root.resolve()
        if not (args.netra_root / "netra" / "__init__.py").exists():
            p.error("--netra-root must hold a netra/ package")
    return args


async def _chaos(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    secret = os.environ.get("NETRA_JWT_SECRET", "") if args.target else secrets.token_urlsafe(32)
    server: _servers.Server | None = None
    env_defaults = chaos_env(args.messages)
    forced = {"NETRA_CHAOS_TOOLS": "1"}
    netra_env = ({**_servers.NETRA_DEFAULTS, **env_defaults} | {
        k: v for k, v in os.environ.items() if k.startswith("NETRA_") and k != "NETRA_JWT_SECRET"} | forced
        | {"NETRA_SCRIPTED_DELAY_MS": str(args.delay_ms)}) if not args.target else {}
    try:
        if args.target:
            url, pid = args.target, args.server_pid
        else:
            log_dir = Path(tempfile.mkdtemp(prefix="netra-chaos-"))
            _log(f"server log: {log_dir}")
            server = _servers.start("netra", secret=secret, delay_ms=args.delay_ms, log_dir=log_dir,
                                    netra_defaults=env_defaults, netra_forced=forced, netra_root=args.netra_root,
                                    nice=args.nice)
            await _servers.wait_ready(server)
            url, pid = server.url, server.proc.pid
            _log(f"netra ready on {url} (pid {pid})")
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        limits = await _preflight(host, port, secret)
        if args.fd_wait is None:
            args.fd_wait = float(limits.get("heartbeat_interval_s") or 20.0) + 5.0
        close_timeout = float(netra_env.get("NETRA_CLOSE_TIMEOUT_S") or os.environ.get("NETRA_CLOSE_TIMEOUT_S") or 2.0)
        # write_timeout_s; slow_consumer_timeout_s is its earlier name (netra before its own transport)
        sc_timeout = float(limits.get("write_timeout_s") or limits.get("slow_consumer_timeout_s") or 5.0)
        tool_timeout = float(limits.get("tool_timeout_s") or 30.0)
        fault_spec = {
            "host": host, "port": port, "prefix": f"chaos-{os.getpid()}", "mix": args.mix,
            "pause_ms": args.fault_pause_ms, "flood_pause_ms": args.flood_pause_ms,
            "stream_chunks": args.stream_chunks, "rcvbuf": args.rcvbuf,
            "write_timeout_s": sc_timeout, "close_timeout_s": close_timeout,
            "slow_observe_s": max(args.slow_observe, sc_timeout + close_timeout + 1), "slow_slack_s": args.slow_slack,
            "run_timeout_s": max(15.0, 3 * tool_timeout + 5), "connect_timeout_s": 15.0,
            "flood_max_s": args.flood_max_s, "go_timeout_s": 60.0, "nice": args.nice,
            "stop_grace_s": max(20.0, args.slow_observe + 5, args.flood_max_s + 10, 3 * tool_timeout + 10),
            "deadline_s": args.warmup + args.phase_timeout + 300,
        }
        rows: dict[str, dict[str, Any]] = {}
        phases = [("baseline", None)] + [("chaos" if i == 0 else f"chaos-{i + 1}", fault_spec if args.mix else None)
                                         for i in range(args.rounds)]
        for name, spec in phases:
            _log(f"phase {name}: {args.users} healthy users x {args.messages} messages"
                 + (f", faulty users {args.mix}" if spec else ""))
            rows[name] = await _phase(name, args, url=url, port=port, secret=secret, pid=pid, fault_spec=spec)
            if server is not None and server.proc.poll() is not None:
                raise RuntimeError(f"netra exited with {server.proc.returncode}:\n{server.log_tail()}")
    finally:
        if server is not None:
            t_stop = time.monotonic()
            _servers.stop(server)  # SIGTERM (netra drains), SIGKILL after 12 s
            stopped = {"stop_s": round(time.monotonic() - t_stop, 2), "returncode": server.proc.returncode}
            _log(f"netra stopped in {stopped['stop_s']} s with {stopped['returncode']}")
    report = _report(args, rows, args.mix, limits, started, netra_env, pid, sc_timeout + close_timeout)
    if server is not None:
        report["server_stop"] = stopped
        report["targets"]["server_stopped_cleanly"] = stopped["returncode"] == 0
        report["targets_met"] = all(report["targets"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        report = trio.run(_chaos, args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the bench could not run: say why, exit 1
        import traceback

        _log(traceback.format_exc())
        _log(f"chaos bench failed: {type(exc).__name__}: {exc}")
        return 1
    for line in _summary(report):
        _log(line)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 2 if args.strict and not report["targets_met"] else 0


def _worker_main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            trio.run(_worker, json.loads(sys.argv[2]))
        except KeyboardInterrupt:
            sys.exit(130)
    else:
        sys.exit("bench.chaos is run as `python -m bench chaos` (see bench/README.md)")


if __name__ == "__main__":
    _worker_main()
