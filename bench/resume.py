"""``python -m bench.resume``: how long a dropped connection takes to come back.

Each of ``--users`` clients streams an answer (``[[stream:N]]`` at the
scripted delay), and after a few deltas its TCP connection is reset under it
(SO_LINGER 0: no close frame, as when a phone changes networks). It opens a
new connection at once, authenticates, sends ``resume`` with the last seq it
processed, and reads on. Per client the bench records the time from the
reset to ``resumed`` and to the first replayed (or live) event after it, and
checks that the run then completes with every event once and in order
(seq) and with deltas that add up to the answer.

Figures: p50 and p99 of both times over all clients, resumes that failed,
runs that completed, seq errors. The server is netra on loopback (127.0.0.1)
with ``NETRA_RESUME_WINDOW_S`` at its default; every wait is bounded.

    python -m bench.resume --users 200 --stream 40 --delay-ms 20
    python -m bench.resume --users 200 --cluster   # resumed on the other node of two

With ``--cluster`` two nodes share the local Redis and a PostgreSQL
database made for the run, and every client resumes on the node that did
not hold its session: the session goes on over a link through Redis
(docs/cluster.md), so the figures include the owner's answer and the relay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import socket
import struct
import sys
import tempfile
from pathlib import Path

import trio

from . import _servers
from ._rawclient import check_handshake, client_frame, handshake_request, mint_token


class Raw:
    """A minimal WebSocket client on a trio socket (frames in, JSON out)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int, token: str) -> Raw:
        sock = trio.socket.socket()
        await sock.connect((_servers.HOST, port))
        raw = cls(sock)
        request, accept = handshake_request(_servers.HOST, port, "/ws", token)
        await sock.send(request)
        while b"\r\n\r\n" not in raw.buf:
            await raw._fill()
        head, _, rest = bytes(raw.buf).partition(b"\r\n\r\n")
        problem = check_handshake(head, accept)
        if problem:
            raise RuntimeError(problem)
        raw.buf = bytearray(rest)
        return raw

    async def _fill(self) -> None:
        data = await self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    async def send(self, obj: dict) -> None:
        await self.sock.send(client_frame(json.dumps(obj).encode()))

    async def event(self) -> dict:
        while True:
            while len(self.buf) < 2:
                await self._fill()
            n, pos = self.buf[1] & 0x7F, 2
            if n == 126:
                while len(self.buf) < 4:
                    await self._fill()
                n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                while len(self.buf) < 10:
                    await self._fill()
                n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
            while len(self.buf) < pos + n:
                await self._fill()
            op, payload = self.buf[0] & 0x0F, bytes(self.buf[pos:pos + n])
            del self.buf[:pos + n]
            if op == 1:
                return json.loads(payload)
            if op == 8:
                raise EOFError("closed by the server")

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def one_user(ports: tuple[int, int], secret: str, user: int, args: argparse.Namespace, out: dict) -> None:
    token = mint_token(secret, f"resume-{user}-{args.nonce}")
    port, other = ports
    raw = await Raw.open(port, token)
    connected = await raw.event()
    await raw.send({"type": "user_message", "text": f"[[stream:{args.stream}]] story {user}", "id": f"s{user}"})
    events = []
    while sum(e["type"] == "text_delta" for e in events) < args.cut_after:
        events.append(await raw.event())
    cut = trio.current_time()
    raw.reset()
    again = await Raw.open(other, token)  # with --cluster, on the other node
    await again.event()  # this connection's own connected
    await again.send({"type": "resume", "session_id": connected["session_id"],
                      "resume_token": connected["resume_token"], "last_seq": events[-1]["seq"]})
    answer = await again.event()
    if answer["type"] != "resumed":
        out["failed"].append(answer.get("code") or answer["type"])
        return
    out["to_resumed"].append(trio.current_time() - cut)
    first = await again.event()
    out["to_first_event"].append(trio.current_time() - cut)
    events.append(first)
    while events[-1]["type"] not in ("agent_completed", "agent_error", "agent_cancelled"):
        events.append(await again.event())
    seqs = [e["seq"] for e in events]
    if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        out["seq_errors"] += 1
    text = "".join(e["delta"] for e in events if e["type"] == "text_delta")
    if events[-1]["type"] == "agent_completed" and text == events[-1]["text"]:
        out["completed"] += 1
    again.sock.close()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 2)


async def main(args: argparse.Namespace) -> dict:
    secret = secrets.token_hex(16)
    args.nonce = secrets.token_hex(4)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-resume-"))
    forced = {"NETRA_MAX_CONNECTIONS_PER_USER": "4"}
    database = None
    if args.cluster:  # two nodes of one cluster: every resume lands on the node that did not hold it
        from .cluster import DEFAULT_DB, DEFAULT_REDIS, _database

        database = f"netra_bench_{secrets.token_hex(6)}"
        forced |= {"NETRA_DATABASE_URL": _database(DEFAULT_DB, database, True), "NETRA_REDIS_URL": DEFAULT_REDIS,
                   "NETRA_REDIS_PREFIX": f"netra-bench:{secrets.token_hex(6)}:"}
    servers = [_servers.start(f"netra{n}", secret=secret, delay_ms=args.delay_ms, log_dir=log_dir,
                              netra_forced=forced) for n in range(2 if args.cluster else 1)]
    ports = (servers[0].port, servers[-1].port)
    out: dict = {"to_resumed": [], "to_first_event": [], "failed": [], "completed": 0, "seq_errors": 0}
    try:
        for server in servers:
            await _servers.wait_ready(server)
        with trio.fail_after(args.timeout):
            async with trio.open_nursery() as nursery:
                limit = trio.Semaphore(args.concurrency)

                async def run(user: int) -> None:
                    async with limit:
                        try:
                            await one_user(ports, secret, user, args, out)
                        except (OSError, EOFError, RuntimeError) as exc:
                            out["failed"].append(type(exc).__name__)

                for user in range(args.users):
                    nursery.start_soon(run, user)
    finally:
        for server in servers:
            _servers.stop(server)
        if database is not None:
            _database(DEFAULT_DB, database, False)
    return {
        "where": "on another node of a cluster (Redis link)" if args.cluster else "on the same server",
        "users": args.users, "stream_chunks": args.stream, "delay_ms": args.delay_ms,
        "resumed": len(out["to_resumed"]), "failed": len(out["failed"]), "failures": sorted(set(out["failed"])),
        "completed": out["completed"], "seq_errors": out["seq_errors"],
        "reset_to_resumed_ms": {"p50": pct(out["to_resumed"], 50), "p99": pct(out["to_resumed"], 99)},
        "reset_to_first_event_ms": {"p50": pct(out["to_first_event"], 50), "p99": pct(out["to_first_event"], 99)},
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
    }


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=100, help="users dropping at once, at most")
    parser.add_argument("--stream", type=int, default=40, help="deltas per answer")
    parser.add_argument("--cut-after", type=int, default=5, help="deltas read before the reset")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="scripted delay per delta")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--cluster", action="store_true",
                        help="two nodes on the local Redis and PostgreSQL; each client resumes on the other node")
    args = parser.parse_args()
    result = trio.run(main, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli()
