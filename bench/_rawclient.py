"""A lean WebSocket load client on raw non-blocking sockets and epoll.

Why not trio-websocket (what ``python -m bench`` uses): it spends about as
much CPU per frame as a fast server does, so on a 2-core machine it, not the
server, set the ceiling. Here every byte on the wire is handled by hand:

- the upgrade is one ``GET /ws`` with ``Authorization: Bearer <jwt>`` and
  ``Sec-WebSocket-Protocol: netra.v1``; the answer must be 101 with the right
  ``Sec-WebSocket-Accept`` and subprotocol;
- client frames are masked text frames (RFC 6455 5.3), masked with one
  big-int XOR; server frames must be unmasked; pings are answered with pongs;
- a timed run is recognised by its terminal event without decoding JSON: a
  byte search for ``"agent_`` tells agent_completed / agent_error /
  agent_cancelled from the rest, and the terminal frame's ``seq`` must equal
  the connection's previous one plus the frames of the run (no gap, nothing
  lost). The runs sent during the warm-up are checked in full instead
  (every frame ``json.loads``-ed, as ``bench/_client.py`` checks them).

Each worker is one process, one epoll, one thread (``python -m
bench._rawclient --worker SPEC``), speaking one JSON line per step to its
parent: ``READY {...}`` after connecting, then on ``GO t_go t_warm t_stop``
(CLOCK_MONOTONIC, shared by the processes of one machine) it sends every
connection's first message at ``t_go``, counts the frames received and the
runs completed between ``t_warm`` and ``t_stop``, sends no new message after
``t_stop``, waits for the runs in flight (bounded) and prints ``RESULT {...}``. In ``idle`` mode it
only holds its connections open until ``CLOSE``. In ``stream`` mode (``python
-m bench.streaming``) each connection streams long answers one after another
and every frame is decoded: each ``text_delta``'s arrival is compared with its
``ts`` and with when its chunk was due.

``--io uvloop`` runs the same connection logic on asyncio + uvloop
protocols instead of the hand-written epoll loop (to compare the two).
"""

from __future__ import annotations

import base64
import errno
import gc
import hashlib
import json
import os
import random
import resource
import select
import socket
import sys
import time
from collections import Counter
from typing import Any

SUBPROTOCOL = "netra.v1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FIVE = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
RECV = 1 << 16  # below malloc's mmap threshold: a larger recv buffer costs an mmap + mremap + munmap per call

_monotonic = time.monotonic
_getrandbits = random.SystemRandom().getrandbits if os.environ.get("BENCH_STRONG_MASK") else random.getrandbits


# --------------------------------------------------------------------------
# framing (client side)


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked, final frame (RFC 6455 5.2). The 4-byte key comes from
    ``random`` (a bench talks to its own server on loopback; no proxy is
    there whose cache the key's unpredictability would protect)."""
    n = len(payload)
    key = _getrandbits(32).to_bytes(4, "big")
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    if not n:
        return head + key
    mask = int.from_bytes((key * ((n + 3) >> 2))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


def handshake_request(host: str, port: int, path: str, token: str | None) -> tuple[bytes, bytes]:
    """(request bytes, expected Sec-WebSocket-Accept)."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13",
             f"Sec-WebSocket-Protocol: {SUBPROTOCOL}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


def check_handshake(head: bytes, accept: bytes) -> str | None:
    """None when ``head`` (the response up to the blank line) is a valid 101, else why not."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"101":
        return f"http_{parts[1].decode(errors='replace') if len(parts) > 1 else '?'}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept:
        return "bad_accept"
    if headers.get(b"sec-websocket-protocol") != SUBPROTOCOL.encode():
        return "subprotocol_not_selected"
    return None


def mint_token(secret: str, sub: str, ttl_s: float = 3600.0) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + int(ttl_s)}, secret, algorithm="HS256")


def message(sub_nonce: str, user_no: int, k: int) -> bytes:
    """The user_message of ``python -m bench`` (bench/_client.py), byte for byte:
    ``json.dumps({"type": "user_message", "id": ..., "text": ...})`` with text
    ``what is [[tool:calculator {"expression": "U*K"}]]``."""
    return (f'{{"type": "user_message", "id": "{sub_nonce}-m{k}", "text": "what is [[tool:calculator '
            f'{{\\"expression\\": \\"{user_no}*{k + 1}\\"}}]]"}}').encode()


# --------------------------------------------------------------------------
# one connection


class Stats:
    """What one worker counts (timed window only, except where said)."""

    def __init__(self) -> None:
        self.t_warm = self.t_stop = float("inf")
        self.runs = 0                  # runs completed (agent_completed) in the window
        self.events = 0                # frames of those runs
        self.lat: list[float] = []     # their send -> agent_completed, seconds
        self.frames_all = 0            # every run's frames received, all phases
        self.window_frames = 0         # frames received between t_warm and t_stop (to one poll)
        self.runs_sent = 0             # all phases
        self.runs_completed_all = 0
        self.failed: Counter[str] = Counter()      # terminal events other than agent_completed, refusals
        self.seq_errors = 0
        self.frames_per_run: Counter[int] = Counter()
        self.verified_ok = 0
        self.verify_failed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()      # connect / transport problems
        self.close_codes: Counter[str] = Counter()
        self.pings = 0
        self.in_flight = 0
        self.open = 0
        self.sending = False


class Conn:
    __slots__ = ("st", "sock", "fd", "user_no", "sub", "nonce", "state", "buf", "out", "k", "sent_at",
                 "frames", "seq", "verify", "vrun", "accept", "token", "write", "closing", "on_open")

    def __init__(self, st: Stats, user_no: int, sub: str, token: str | None) -> None:
        self.st = st
        self.user_no, self.sub, self.token = user_no, sub, token
        self.nonce = f"{sub}-{os.urandom(4).hex()}"
        self.state = "new"   # new, connecting, upgrading, opening, open, closed
        self.buf = b""
        self.out = b""
        self.k = 0
        self.sent_at = 0.0
        self.frames = 0
        self.seq = 0
        self.verify = False
        self.vrun: dict[str, Any] | None = None
        self.accept = b""
        self.sock: socket.socket | None = None
        self.fd = -1
        self.write = None    # set by the I/O driver
        self.closing = False
        self.on_open = None

    # -- sending

    def send_next(self, now: float) -> None:
        st = self.st
        self.verify = now < st.t_warm
        if self.verify:
            self.vrun = {"types": [], "deltas": [], "calls": set(), "run_id": None, "ok": True,
                         "mid": f"{self.nonce}-m{self.k}", "args": {"expression": f"{self.user_no}*{self.k + 1}"}}
        self.frames = 0
        self.sent_at = now
        self.write(client_frame(message(self.nonce, self.user_no, self.k)))
        self.k += 1
        st.runs_sent += 1
        st.in_flight += 1

    def close(self, code: int = 1000) -> None:
        if self.state == "open" and not self.closing:
            self.closing = True
            self.write(client_frame(code.to_bytes(2, "big"), opcode=8))

    # -- receiving

    def feed(self, data: bytes) -> None:
        """Bytes from the socket: parse every complete frame."""
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln >= 126:
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = (data[pos + 2] << 8) | data[pos + 3]
                    hl = 4
                else:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(data[pos + 2:pos + 10], "big")
                    hl = 10
            end = pos + hl + ln
            if end > n:
                break
            b0 = data[pos]
            if b1 & 0x80 or b0 & 0x70 or not b0 & 0x80:
                # masked, reserved bits or a fragment: netra and the peer send none of these
                self.st.errors["unexpected_frame_bits"] += 1
                self.abort()
                return
            op = b0 & 0x0F
            if op == 1:
                self.text(data, pos + hl, end)
            elif op == 9:
                self.st.pings += 1
                self.write(client_frame(data[pos + hl:end], opcode=10))
            elif op == 8:
                code = int.from_bytes(data[pos + hl:pos + hl + 2], "big") if ln >= 2 else 1005
                self.st.close_codes[str(code)] += 1
                if not self.closing:
                    self.closing = True
                    self.write(client_frame(data[pos + hl:pos + hl + 2], opcode=8))
                self.abort(counted=True)
                return
            elif op != 10:
                self.st.errors[f"opcode_{op}"] += 1
            pos = end
        if pos < n:
            self.buf = data[pos:]

    def text(self, data: bytes, start: int, end: int) -> None:
        if self.state != "open":
            self.opening(data[start:end])
            return
        self.frames += 1
        self.st.frames_all += 1
        if self.verify:
            self.check(data[start:end])
            return
        i = data.find(b'"agent_', start, end)
        if i < 0:
            if data.find(b'"error"', start, end) >= 0:  # a refusal, or a tool error (not in this script)
                event = json.loads(data[start:end])
                if event.get("type") == "error":
                    self.seq += self.frames
                    self.finish(f"error:{event.get('code')}")
            return
        c = data[i + 7]
        if c == 99 and data[i + 8] == 111:        # "agent_co(mpleted)
            j = data.find(b'"seq":', start, end) + 6
            seq = int(data[j:data.find(b",", j, end)])
            if seq != self.seq + self.frames:
                self.st.seq_errors += 1
            self.seq = seq
            self.finish(None)
        elif c == 101 or c == 99:                 # "agent_e(rror) / "agent_ca(ncelled)
            event = json.loads(data[start:end])
            self.seq = event.get("seq", self.seq + self.frames)
            self.finish(f"{event.get('type')}:{event.get('code') or event.get('reason')}")

    def finish(self, failure: str | None) -> None:
        st = self.st
        now = _monotonic()
        st.in_flight -= 1
        if failure is None:
            st.runs_completed_all += 1
            if st.t_warm <= now <= st.t_stop:
                st.runs += 1
                st.events += self.frames
                st.lat.append(now - self.sent_at)
                st.frames_per_run[self.frames] += 1
        else:
            st.failed[failure] += 1
        if st.sending and now < st.t_stop and not self.closing:
            self.send_next(now)

    def check(self, raw: bytes) -> None:
        """A warm-up run: every frame decoded and checked (protocol v1)."""
        v = self.vrun
        event = json.loads(raw)
        seq = event.get("seq")
        if seq != self.seq + 1:
            self.st.seq_errors += 1
        self.seq = seq if isinstance(seq, int) else self.seq + 1
        kind = event.get("type")
        if kind == "error":
            if event.get("ref") == v["mid"]:
                self.finish(f"error:{event.get('code')}")
            return
        rid = event.get("run_id")
        if rid is None:
            return
        if v["run_id"] is None and kind in ("run_queued", "agent_started"):
            v["run_id"] = rid
        if rid != v["run_id"]:
            v["ok"] = False
            self.st.verify_failed["foreign_run_id"] += 1
            return
        v["types"].append(kind)
        if kind == "text_delta":
            v["deltas"].append(event.get("delta", ""))
        elif kind == "tool_executing":
            v["calls"].add(event.get("tool_call_id"))
            if event.get("args") != v["args"]:
                v["ok"] = False
                self.st.verify_failed["args_mismatch"] += 1
        elif kind == "tool_completed":
            if event.get("tool_call_id") not in v["calls"]:
                v["ok"] = False
                self.st.verify_failed["tool_pairing"] += 1
            v["calls"].discard(event.get("tool_call_id"))
        elif kind == "agent_completed":
            it = iter(v["types"])
            if not all(t in it for t in FIVE):
                v["ok"] = False
                self.st.verify_failed["five_not_in_order"] += 1
            if event.get("text") != "".join(v["deltas"]):
                v["ok"] = False
                self.st.verify_failed["text_mismatch"] += 1
            if v["calls"]:
                v["ok"] = False
                self.st.verify_failed["tool_pairing"] += 1
            self.st.verified_ok += v["ok"]
            self.finish(None)
        elif kind in ("agent_error", "agent_cancelled"):
            self.finish(f"{kind}:{event.get('code') or event.get('reason')}")

    def opening(self, raw: bytes) -> None:
        """The server's first frame: must be ``connected`` with seq 1 and our user id."""
        try:
            event = json.loads(raw)
        except ValueError:
            event = {}
        if event.get("type") != "connected" or event.get("seq") != 1:
            self.st.errors["first_frame_not_connected"] += 1
        elif event.get("user_id") not in (None, self.sub):
            self.st.errors["connected_as_someone_else"] += 1
        self.seq = event.get("seq", 1) if isinstance(event.get("seq"), int) else 1
        self.state = "open"
        self.st.open += 1
        if self.on_open is not None:
            self.on_open(self)

    def upgraded(self, data: bytes) -> bool:
        """Handshake bytes; True once the 101 is complete (rest fed as frames)."""
        self.buf += data
        i = self.buf.find(b"\r\n\r\n")
        if i < 0:
            if len(self.buf) > 16384:
                self.fail("handshake_too_long")
            return False
        head, rest = self.buf[:i], self.buf[i + 4:]
        self.buf = b""
        why = check_handshake(head, self.accept)
        if why:
            self.fail(why)
            return False
        self.state = "opening"
        if rest:
            self.feed(rest)
        return True

    # -- set by drivers

    def fail(self, why: str) -> None:
        self.st.errors[f"connect:{why}"] += 1
        self.abort()

    def abort(self, counted: bool = False) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------
# the epoll driver


class EpollConn(Conn):
    __slots__ = ("drv",)

    def abort(self, counted: bool = False) -> None:
        self.drv.drop(self, counted)


class EpollDriver:
    """Every connection of this worker on one epoll, level-triggered."""

    def __init__(self, st: Stats) -> None:
        self.st = st
        self.ep = select.epoll()
        self.conns: dict[int, EpollConn] = {}
        self.connecting: set[EpollConn] = set()  # started, not yet open nor dropped

    def _writer(self, c: EpollConn):
        sock_send = c.sock.send

        def write(data: bytes) -> None:
            if c.out:
                c.out += data
                return
            try:
                sent = sock_send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.drop(c, False, "send_error")
                return
            if sent < len(data):
                c.out = data[sent:]
                self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)
        return write

    def start_connect(self, c: EpollConn, host: str, port: int, path: str, source: str | None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source:  # the port is then chosen at connect(), per destination: no ephemeral-port exhaustion
                sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
                sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
        c.sock, c.fd, c.drv = sock, sock.fileno(), self
        c.state = "connecting"
        c.write = self._writer(c)
        c.on_open = self.connecting.discard
        self.conns[c.fd] = c
        self.connecting.add(c)
        req, c.accept = handshake_request(host, port, path, c.token)
        c.out = req
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            self.drop(c, False, f"connect:{errno.errorcode.get(err, err)}")
            return
        self.ep.register(c.fd, EPOLLOUT | EPOLLIN)

    def drop(self, c: Conn, counted: bool, why: str | None = None) -> None:
        if c.state == "closed":
            return
        if why:
            self.st.errors[why] += 1
        if c.state == "open":
            self.st.open -= 1
            if not c.closing and not counted:
                self.st.errors["dropped_by_server"] += 1
        elif c.state in ("connecting", "upgrading", "opening") and why is None and not counted:
            self.st.errors["connect:closed"] += 1
        c.state = "closed"
        self.connecting.discard(c)
        self.conns.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass

    def poll(self, timeout: float) -> None:
        conns = self.conns
        for fd, ev in self.ep.poll(timeout, 1024):
            c = conns.get(fd)
            if c is None:
                continue
            if ev & EPOLLOUT:
                self._on_writable(c)
                if c.state == "closed":
                    continue
            if ev & EPOLL_READ:
                try:
                    data = c.sock.recv(RECV)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.drop(c, False, f"recv:{errno.errorcode.get(exc.errno, exc.errno)}")
                    continue
                if not data:
                    self.drop(c, c.closing, None if c.closing else "eof")
                    continue
                if c.state == "open":
                    c.feed(data)
                elif c.state == "upgrading":
                    c.upgraded(data)
                elif c.state == "opening":
                    c.feed(data)

    def _on_writable(self, c: EpollConn) -> None:
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.drop(c, False, f"connect:{errno.errorcode.get(err, err)}")
                return
            c.state = "upgrading"
        if c.out:
            try:
                sent = c.sock.send(c.out)
            except BlockingIOError:
                return
            except OSError:
                self.drop(c, False, "send_error")
                return
            c.out = c.out[sent:]
        if not c.out:
            self.ep.modify(c.fd, EPOLLIN)


# --------------------------------------------------------------------------
# worker


def _emit(tag: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(payload, separators=(',', ':'))}\n")
    sys.stdout.flush()


def _raise_nofile(need: int = 0) -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, or to ``need`` above it when
    we may (CAP_SYS_RESOURCE); returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _cpu() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "sys": r.ru_stime}


def _read_command(timeout_s: float) -> str:
    """One line from the parent on stdin (bounded)."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    if not ready:
        raise TimeoutError("no command from the parent")
    line = sys.stdin.readline()
    if not line:
        os._exit(3)  # the parent is gone
    return line.strip()


def _users(spec: dict[str, Any], st: Stats, cls: type[Conn]) -> list[Conn]:
    secret = os.environ["NETRA_JWT_SECRET"]
    first = spec["first_user"]
    return [cls(st, n, f"{spec['prefix']}-u{n}", mint_token(secret, f"{spec['prefix']}-u{n}"))
            for n in range(first, first + spec["users"])]


def _connect_all(drv: EpollDriver, conns: list[EpollConn], spec: dict[str, Any]) -> float:
    """Open every connection, at most ``connect_concurrency`` in flight, each
    from the next of ``sources`` (local addresses, so that many connections to
    one server port do not run out of ephemeral ports), all within
    ``connect_phase_s``."""
    host, port, path = spec["host"], spec["port"], spec.get("path", "/ws")
    sources = spec.get("sources") or [None]
    limit = spec["connect_concurrency"]
    t0 = _monotonic()
    deadline = t0 + spec["connect_phase_s"]
    todo = list(reversed(conns))
    i = 0
    while (todo or drv.connecting) and _monotonic() < deadline:
        while todo and len(drv.connecting) < limit:
            c = todo.pop()
            try:
                drv.start_connect(c, host, port, path, sources[i % len(sources)])
            except OSError as exc:  # EMFILE, EADDRINUSE...: counted, the others go on
                drv.st.errors[f"connect:{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
                if c.sock is not None:
                    c.sock.close()
                drv.connecting.discard(c)
                drv.conns.pop(c.fd, None)
            i += 1
        drv.poll(0.05)
    for c in list(drv.connecting):
        drv.drop(c, False, "connect:timeout")
    if todo:
        drv.st.errors["connect:not_started"] += len(todo)
    return _monotonic() - t0


def _close_all(drv: EpollDriver, timeout_s: float) -> float:
    """Close frames out, wait (bounded) for the server's, then close the sockets."""
    t0 = _monotonic()
    for c in list(drv.conns.values()):
        c.close()
    deadline = t0 + timeout_s
    while drv.conns and _monotonic() < deadline:
        drv.poll(0.05)
    for c in list(drv.conns.values()):
        drv.drop(c, True)
    return _monotonic() - t0


def _result(st: Stats, extra: dict[str, Any]) -> dict[str, Any]:
    return {"runs": st.runs, "events": st.events, "window_frames": st.window_frames,
            "lat": [round(x, 6) for x in st.lat],
            "runs_sent": st.runs_sent, "runs_completed_all": st.runs_completed_all,
            "failed": dict(st.failed), "seq_errors": st.seq_errors,
            "frames_per_run": {str(k): v for k, v in st.frames_per_run.items()},
            "verified_ok": st.verified_ok, "verify_failed": dict(st.verify_failed),
            "errors": dict(st.errors), "close_codes": dict(st.close_codes), "pings": st.pings, **extra}


def worker_load(spec: dict[str, Any]) -> None:
    _raise_nofile(spec["users"] + 200)
    st = Stats()
    drv = EpollDriver(st)
    conns = _users(spec, st, EpollConn)
    connect_s = _connect_all(drv, conns, spec)
    _emit("READY", {"open": st.open, "connect_s": round(connect_s, 3), "errors": dict(st.errors),
                    "pid": os.getpid()})
    cmd = _read_command(spec["go_timeout_s"]).split()
    if cmd[:1] != ["GO"]:
        raise RuntimeError(f"expected GO, got {cmd!r}")
    t_go, st.t_warm, st.t_stop = (float(x) for x in cmd[1:4])
    gc.collect()
    gc.freeze()
    gc.disable()  # the hot path makes no reference cycles; the collector's passes over the latencies are waste
    while _monotonic() < t_go:
        time.sleep(min(0.001, max(0.0, t_go - _monotonic())))
    cpu0, t0 = _cpu(), _monotonic()
    st.sending = True
    now = _monotonic()
    for c in conns:
        if c.state == "open":
            c.send_next(now)
    stop, warm = st.t_stop, st.t_warm
    poll = drv.poll
    while _monotonic() < warm:
        poll(max(0.0, min(0.005, warm - _monotonic())))
    at_warm = st.frames_all
    while _monotonic() < stop:
        poll(max(0.0, min(0.005, stop - _monotonic())))
    st.window_frames = st.frames_all - at_warm
    st.sending = False
    drain_deadline = _monotonic() + spec["drain_timeout_s"]
    while st.in_flight > 0 and drv.conns and _monotonic() < drain_deadline:
        poll(0.02)
    cpu1, t1 = _cpu(), _monotonic()
    unfinished = st.in_flight
    close_s = _close_all(drv, spec.get("close_timeout_s", 5.0))
    _emit("RESULT", _result(st, {"unfinished_at_drain": unfinished, "close_s": round(close_s, 3),
                                 "cpu_user_s": cpu1["user"] - cpu0["user"], "cpu_sys_s": cpu1["sys"] - cpu0["sys"],
                                 "wall_s": t1 - t0}))


def worker_idle(spec: dict[str, Any]) -> None:
    """Open ``users`` authenticated connections, hold them (answering pings)
    until the parent says CLOSE, then close them all."""
    nofile = _raise_nofile(spec["users"] + 200)
    st = Stats()
    drv = EpollDriver(st)
    conns = _users(spec, st, EpollConn)
    connect_s = _connect_all(drv, conns, spec)
    _emit("READY", {"open": st.open, "connect_s": round(connect_s, 3), "errors": dict(st.errors),
                    "nofile": list(nofile), "pid": os.getpid()})
    deadline = _monotonic() + spec["hold_timeout_s"]
    while _monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], 0)
        if ready:
            line = sys.stdin.readline()
            if not line:
                os._exit(3)
            if line.strip() == "CLOSE":
                break
        drv.poll(0.1)
    open_before = st.open
    errors_before = dict(st.errors)
    close_s = _close_all(drv, spec.get("close_timeout_s", 60.0))
    _emit("CLOSED", {"open_before_close": open_before, "close_s": round(close_s, 3),
                     "dropped_while_idle": errors_before.get("dropped_by_server", 0) + errors_before.get("eof", 0),
                     "errors": dict(st.errors), "close_codes": dict(st.close_codes), "pings": st.pings})


# --------------------------------------------------------------------------
# streaming runs (``python -m bench.streaming``)


# the client's JSON decoding is not what is measured: the cheapest one
try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is one of netra's dependencies
    _loads = json.loads

_wall_ms = time.time_ns


class StreamConn(EpollConn):
    """One user streaming runs one after another: every frame is decoded and
    checked (``seq`` +1, the run's own ``run_id``, the deltas' concatenation
    equals ``agent_completed.text``); each ``text_delta``'s arrival is stamped
    with the wall clock, to compare with its ``ts``."""

    __slots__ = ("cfg", "left", "run_id", "mid", "anchor", "prev", "parts", "chars", "marks", "due_by", "finished")

    def start_run(self, now: float) -> None:
        cfg = self.cfg
        self.run_id = None
        self.mid = f"{self.nonce}-s{self.k}"
        self.anchor = None
        self.prev = None
        self.parts = []
        self.chars = 0
        self.marks = []  # (arrival ms, characters received so far) per text_delta frame
        self.due_by = now + cfg["run_timeout_s"]
        self.k += 1
        self.left -= 1
        self.st.runs_sent += 1
        self.st.in_flight += 1
        self.write(client_frame(json.dumps({"type": "user_message", "id": self.mid, "text": cfg["text"]}).encode()))

    def text(self, data: bytes, start: int, end: int) -> None:
        if self.state != "open":
            self.opening(data[start:end])
            return
        arrived = _wall_ms() / 1e6
        st = self.st
        st.frames_all += 1
        event = _loads(data[start:end])
        seq = event.get("seq")
        if seq != self.seq + 1:
            st.seq_errors += 1
        self.seq = seq if isinstance(seq, int) else self.seq + 1
        kind = event.get("type")
        if kind == "error":
            if event.get("ref") == self.mid:
                self.end(f"error:{event.get('code')}")
            return
        rid = event.get("run_id")
        if rid is None or self.mid is None:
            return
        if self.run_id is None and kind in ("run_queued", "agent_started"):
            self.run_id = rid
        if rid != self.run_id:
            st.verify_failed["foreign_run_id"] += 1
            return
        if kind == "text_delta":
            st.delta_ms.append(round(arrived - event["ts"], 2))
            if self.prev is not None:
                st.gap_ms.append(round(arrived - self.prev, 2))
            self.prev = arrived
            self.parts.append(event["delta"])
            self.chars += len(event["delta"])
            self.marks.append((arrived, self.chars))
        elif kind == "agent_thinking":
            self.anchor = event.get("ts")
        elif kind == "agent_completed":
            text = event.get("text") or ""
            if "".join(self.parts) != text:
                st.verify_failed["text_mismatch"] += 1
                self.end("text_mismatch")
                return
            self.lateness(len(text), arrived)
            self.end(None)
        elif kind in ("agent_error", "agent_cancelled"):
            self.end(f"{kind}:{event.get('code') or event.get('reason')}")

    def lateness(self, total: int, arrived: float) -> None:
        """Each delta frame's arrival against when its last chunk was due: the
        run's last ``agent_thinking`` ``ts`` + k x delay for chunk k. The
        answer is cut into N chunks of nearly equal length (the first
        ``extra`` one character longer), so the characters received so far
        say which chunk a frame ends with, even when a server merged several
        chunks into one frame."""
        st, cfg = self.st, self.cfg
        n = max(1, min(cfg["chunks"], total))
        size, extra = divmod(total, n)
        big = extra * (size + 1)
        if len(self.marks) < n:
            st.merged_runs += 1
            st.frames_saved += n - len(self.marks)
        if self.anchor is None or not size:
            return
        delay = cfg["delay_ms"]
        for at, chars in self.marks:
            k = chars // (size + 1) if chars <= big else extra + (chars - big) // size
            st.late_ms.append(round(at - (self.anchor + k * delay), 2))

    def end(self, failure: str | None) -> None:
        st = self.st
        st.in_flight -= 1
        self.mid = None
        if failure is None:
            st.runs_completed_all += 1
            if len(self.marks) != self.cfg["chunks"]:
                st.frames_per_run[len(self.marks)] += 1
        else:
            st.failed[failure] += 1
        if self.left > 0 and not self.closing:
            self.start_run(_monotonic())
        else:
            self.finished = True


def worker_stream(spec: dict[str, Any]) -> None:
    """Open ``users`` connections; on ``GO t_go`` each starts its first run at
    t_go + a uniform random offset within ``spread_s`` (so that about one run
    per connection streams at any time), and each of its ``runs_per_user``
    runs the moment the previous one ended; then ``RESULT``."""
    _raise_nofile(spec["users"] + 200)
    st = Stats()
    st.delta_ms, st.late_ms, st.gap_ms = [], [], []
    st.merged_runs = st.frames_saved = 0
    drv = EpollDriver(st)
    conns = _users(spec, st, StreamConn)
    cfg = {"text": spec["text"], "chunks": spec["chunks"], "delay_ms": spec["delay_ms"],
           "run_timeout_s": spec["run_timeout_s"]}
    for c in conns:
        c.cfg, c.left, c.mid, c.marks, c.finished = cfg, spec["runs_per_user"], None, [], False
    connect_s = _connect_all(drv, conns, spec)
    _emit("READY", {"open": st.open, "connect_s": round(connect_s, 3), "errors": dict(st.errors),
                    "pid": os.getpid()})
    cmd = _read_command(spec["go_timeout_s"]).split()
    if cmd[:1] != ["GO"]:
        raise RuntimeError(f"expected GO, got {cmd!r}")
    t_go = float(cmd[1])
    rng = random.Random()
    starts = sorted((t_go + rng.uniform(0, spec["spread_s"]), i) for i, c in enumerate(conns) if c.state == "open")
    gc.collect()
    gc.freeze()
    cpu0 = _cpu()
    while _monotonic() < t_go:
        time.sleep(min(0.001, max(0.0, t_go - _monotonic())))
    t0 = _monotonic()
    deadline = t0 + spec["deadline_s"]
    nxt = 0
    last_check = t0
    active = [c for c in conns if c.state == "open"]
    while _monotonic() < deadline:
        now = _monotonic()
        while nxt < len(starts) and starts[nxt][0] <= now:
            c = conns[starts[nxt][1]]
            nxt += 1
            if c.state == "open":
                c.start_run(now)
        if now - last_check >= 0.25:
            last_check = now
            for c in active:
                if c.mid is not None and now > c.due_by and c.state == "open":
                    st.failed["run_timeout"] += 1
                    st.in_flight -= 1
                    c.mid, c.left, c.finished = None, 0, True
                    drv.drop(c, True, "run_timeout")
            if nxt >= len(starts) and all(c.finished or c.state != "open" for c in active):
                break
        wait = 0.05 if nxt >= len(starts) else max(0.0, min(0.05, starts[nxt][0] - now))
        drv.poll(wait)
    t1, cpu1 = _monotonic(), _cpu()
    unfinished = sum(1 for c in active if not c.finished and c.state == "open")
    dropped = sum(1 for c in active if c.state != "open" and not c.finished)
    _emit("RESULT", {"delta_ms": st.delta_ms, "late_ms": st.late_ms, "gap_ms": st.gap_ms,
                     "runs_sent": st.runs_sent, "runs_ok": st.runs_completed_all, "failed": dict(st.failed),
                     "unfinished": unfinished, "dropped": dropped, "seq_errors": st.seq_errors,
                     "verify_failed": dict(st.verify_failed), "merged_runs": st.merged_runs,
                     "frames_saved_by_merging": st.frames_saved,
                     "delta_frames_per_run_other": {str(k): v for k, v in st.frames_per_run.items()},
                     "frames": st.frames_all, "errors": dict(st.errors), "close_codes": dict(st.close_codes),
                     "pings": st.pings, "cpu_user_s": round(cpu1["user"] - cpu0["user"], 3),
                     "cpu_sys_s": round(cpu1["sys"] - cpu0["sys"], 3), "wall_s": round(t1 - t0, 3)})
    _close_all(drv, spec.get("close_timeout_s", 5.0))


# --------------------------------------------------------------------------
# the same connection logic on asyncio + uvloop (for comparison: --io uvloop)


def worker_load_uvloop(spec: dict[str, Any]) -> None:
    import asyncio

    import uvloop

    st = Stats()

    class UvConn(Conn):
        __slots__ = ("t",)

        def abort(self, counted: bool = False) -> None:
            self.t.abort()

    class Proto(asyncio.Protocol):
        __slots__ = ("c", "t")

        def __init__(self, c: Conn) -> None:
            self.c = c

        def connection_made(self, transport) -> None:
            self.t = transport
            c = self.c
            c.write, c.t = transport.write, transport
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            req, c.accept = handshake_request(spec["host"], spec["port"], spec.get("path", "/ws"), c.token)
            c.state = "upgrading"
            transport.write(req)

        def data_received(self, data: bytes) -> None:
            c = self.c
            if c.state == "open":
                c.feed(data)
            elif c.state == "upgrading":
                c.upgraded(data)
            else:
                c.feed(data)

        def connection_lost(self, exc) -> None:
            c = self.c
            if c.state == "open":
                st.open -= 1
                if not c.closing:
                    st.errors["dropped_by_server"] += 1
            c.state = "closed"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        conns = _users(spec, st, UvConn)
        sem = asyncio.Semaphore(spec["connect_concurrency"])
        t0 = loop.time()

        async def one(c: Conn) -> None:
            async with sem:
                opened = loop.create_future()
                c.on_open = lambda _c: opened.done() or opened.set_result(None)
                try:
                    await asyncio.wait_for(loop.create_connection(lambda: Proto(c), spec["host"], spec["port"]),
                                           spec["connect_phase_s"])
                    await asyncio.wait_for(opened, spec["connect_phase_s"])
                except (OSError, TimeoutError) as exc:
                    st.errors[f"connect:{type(exc).__name__}"] += 1

        await asyncio.gather(*(one(c) for c in conns))
        _emit("READY", {"open": st.open, "connect_s": round(loop.time() - t0, 3), "errors": dict(st.errors),
                        "pid": os.getpid()})
        cmd = (await loop.run_in_executor(None, _read_command, spec["go_timeout_s"])).split()
        t_go, st.t_warm, st.t_stop = (float(x) for x in cmd[1:4])
        await asyncio.sleep(max(0.0, t_go - _monotonic()))
        cpu0, t0 = _cpu(), _monotonic()
        st.sending = True
        now = _monotonic()
        for c in conns:
            if c.state == "open":
                c.send_next(now)
        await asyncio.sleep(max(0.0, st.t_warm - _monotonic()))
        at_warm = st.frames_all
        await asyncio.sleep(max(0.0, st.t_stop - _monotonic()))
        st.window_frames = st.frames_all - at_warm
        st.sending = False
        drain_deadline = _monotonic() + spec["drain_timeout_s"]
        while st.in_flight > 0 and _monotonic() < drain_deadline:
            await asyncio.sleep(0.01)
        cpu1, t1 = _cpu(), _monotonic()
        unfinished = st.in_flight
        for c in conns:
            c.close()
        await asyncio.sleep(0.5)
        _emit("RESULT", _result(st, {"unfinished_at_drain": unfinished, "close_s": 0.5,
                                     "cpu_user_s": cpu1["user"] - cpu0["user"],
                                     "cpu_sys_s": cpu1["sys"] - cpu0["sys"], "wall_s": t1 - t0}))

    uvloop.run(main())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        mode = spec.get("mode", "load")
        try:
            if mode == "idle":
                worker_idle(spec)
            elif mode == "stream":
                worker_stream(spec)
            elif spec.get("io") == "uvloop":
                worker_load_uvloop(spec)
            else:
                worker_load(spec)
        except KeyboardInterrupt:
            sys.exit(130)
    else:
        sys.exit("bench._rawclient is a worker of `python -m bench hotpath`, `python -m bench.idle` and "
                 "`python -m bench.streaming`")


if __name__ == "__main__":
    main()
