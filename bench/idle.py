"""``python -m bench.idle``: server memory per idle authenticated WebSocket connection.

For each server in turn (netra, the FastAPI peer, the raw floor; one server
process alive at a time, so none is measured while another is being loaded),
the bench:

1. starts it and opens and closes ``--warmup`` connections, so one-time
   costs (lazy imports, first-request caches) are not charged to connections;
2. reads its RSS (``/proc/PID/status`` VmRSS) = "before";
3. opens ``--connections`` connections (one user each, bearer token),
   at most ``--connect-concurrency`` in flight, spread over
   ``--processes`` client processes (each raises its soft RLIMIT_NOFILE
   to the hard limit), each waiting for its ``connected`` event;
4. waits ``--settle-s``, reads RSS again = "open";
5. closes every connection from the client side, waits, and reads
   RSS, open file descriptors and, for netra, /readyz ``connections``.

``rss_per_connection_kib`` = (open - before) / connections actually open.
Nothing is sent on the idle connections (netra's heartbeat pings, which the
client answers, still run: that is part of an idle connection's life).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import connect_websocket_url

from . import _servers, _spawn
from ._client import SUBPROTOCOL, mint_token
from .load import LineReader


# --------------------------------------------------------------------------
# worker process


async def _worker(spec: dict[str, Any]) -> None:
    limit = _spawn.raise_nofile()
    secret = os.environ["NETRA_JWT_SECRET"]
    stdin = LineReader(trio.lowlevel.FdStream(os.dup(0)))
    sockets: list[Any] = []
    errors: dict[str, int] = {}

    close_now = trio.Event()
    state = {"open": 0, "close_errors": 0}
    connect_limiter = trio.CapacityLimiter(spec["connect_concurrency"])
    close_limiter = trio.CapacityLimiter(spec["connect_concurrency"])

    def count(key: str) -> None:
        errors[key] = errors.get(key, 0) + 1

    async def hold(n: int) -> None:
        """One connection in a nursery of its own: trio-websocket's reader task
        can raise when a server ping crosses our close (it answers with a
        pong in state LOCAL_CLOSING); that must end this connection only."""
        sub = f"idle-{spec['prefix']}-u{n}"
        headers = [(b"authorization", f"Bearer {mint_token(secret, sub)}".encode())]
        closing = False
        try:
            async with trio.open_nursery() as own:
                async with connect_limiter:
                    try:
                        with trio.fail_after(spec["connect_timeout_s"]):
                            ws = await connect_websocket_url(own, spec["url"], subprotocols=[SUBPROTOCOL],
                                                             extra_headers=headers)
                            first = json.loads(await ws.get_message())
                        if first.get("type") != "connected":
                            raise RuntimeError("first frame not connected")
                    except Exception as exc:  # noqa: BLE001
                        count(f"connect:{type(exc).__name__}")
                        own.cancel_scope.cancel()
                        return
                sockets.append(ws)
                await close_now.wait()
                closing = True
                if ws.closed is None:
                    state["open"] += 1
                async with close_limiter:
                    with trio.move_on_after(spec["connect_timeout_s"]):
                        await ws.aclose()
                own.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001
            if closing:
                state["close_errors"] += 1
            else:
                count(f"dropped:{type(exc).__name__}")

    with trio.fail_after(spec["deadline_s"]):
        async with trio.open_nursery() as conns:
            t0 = time.monotonic()
            for n in range(spec["first_user"], spec["first_user"] + spec["users"]):
                conns.start_soon(hold, n)
            while len(sockets) + sum(errors.values()) < spec["users"]:
                await trio.sleep(0.05)
            _spawn.emit("READY", {"connected": len(sockets), "errors": errors, "connect_s": time.monotonic() - t0,
                                  "nofile": list(limit)})
            if (await stdin.readline()).strip() != "CLOSE":
                raise RuntimeError("expected CLOSE")
            t1 = time.monotonic()
            close_now.set()
            with trio.move_on_after(spec["close_timeout_s"]) as scope:
                while True:
                    await trio.sleep(0.05)
                    if not conns.child_tasks:
                        break
            _spawn.emit("CLOSED", {"open_before_close": state["open"], "close_errors": state["close_errors"],
                                   "dropped_while_idle": sum(v for k, v in errors.items() if k.startswith("dropped:")),
                                   "close_s": time.monotonic() - t1, "close_timed_out": scope.cancelled_caught})
            conns.cancel_scope.cancel()


# --------------------------------------------------------------------------
# parent


async def _connect_batch(server: _servers.Server, n: int, procs: int, concurrency: int, secret: str,
                         tag: str) -> tuple[list[Any], list[dict[str, Any]]]:
    specs, first = [], 1
    connect_phase_s = 120 + n * 30 / max(1, concurrency)
    for count in _spawn.split(n, procs):
        specs.append({"url": server.url, "prefix": f"{tag}-{os.getpid()}", "first_user": first, "users": count,
                      "connect_concurrency": max(1, concurrency // procs), "connect_timeout_s": 30.0,
                      "close_timeout_s": 60.0, "deadline_s": connect_phase_s + 3600})
        first += count
    workers = await _spawn.spawn("bench.idle", specs, secret)
    try:
        with trio.fail_after(connect_phase_s):
            ready = [await _spawn.expect(r, "READY") for _, r in workers]
    except BaseException:
        await _spawn.reap(workers, grace_s=0)
        raise
    return workers, ready


async def _close_batch(workers: list[Any]) -> list[dict[str, Any]]:
    try:
        for proc, _ in workers:
            await proc.stdin.send_all(b"CLOSE\n")
        with trio.fail_after(120):
            return [await _spawn.expect(r, "CLOSED") for _, r in workers]
    finally:
        await _spawn.reap(workers)


async def _snapshot(server: _servers.Server) -> dict[str, Any]:
    pid = server.proc.pid
    ready = await _spawn.readyz(server)
    return {"rss_kib": (_servers.status_kib(pid, "VmRSS") or {}).get("VmRSS"), "fds": _servers.fd_count(pid),
            "connections": None if ready is None else ready.get("connections"),
            "users": None if ready is None else ready.get("users")}


async def _one(kind: str, args: argparse.Namespace, secret: str, log_dir: Path) -> dict[str, Any]:
    k = args.connections
    server = _servers.start(kind, secret=secret, delay_ms=0.0, log_dir=log_dir, netra_forced={
        "NETRA_MAX_CONNECTIONS": str(k + args.warmup + 1000)})
    try:
        await _servers.wait_ready(server)
        pid = server.proc.pid
        server_nofile = _spawn.nofile_of(pid)
        warn = None
        if server_nofile is not None and server_nofile < k + 200:
            warn = f"server's open-file limit {server_nofile} < connections + 200: it cannot hold {k}"
            print(f"{kind}: {warn}", file=sys.stderr)
        if args.warmup:
            workers, _ = await _connect_batch(server, args.warmup, 1, min(args.warmup, 50), secret, f"{kind}-warm")
            await _close_batch(workers)
        await trio.sleep(args.settle_s)
        before = await _snapshot(server)
        busy = _spawn.MachineBusy()
        t0 = time.monotonic()
        workers, ready = await _connect_batch(server, k, args.processes, args.connect_concurrency, secret, kind)
        connect_s = time.monotonic() - t0
        connected = sum(r["connected"] for r in ready)
        errors: dict[str, int] = {}
        for r in ready:
            for key, n in r["errors"].items():
                errors[key] = errors.get(key, 0) + n
        print(f"{kind}: {connected}/{k} open in {connect_s:.1f} s", file=sys.stderr, flush=True)
        await trio.sleep(args.settle_s)
        opened = await _snapshot(server)
        opened["hwm_mib"] = (_servers.rss_mib(pid) or {}).get("hwm")
        closed = await _close_batch(workers)
        machine_busy = busy.stop()
        # wait (bounded) for the server to notice every close
        after = await _snapshot(server)
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline:
            if (after["connections"] in (None, 0)) and (after["fds"] or 0) <= (before["fds"] or 0) + 2:
                break
            await trio.sleep(0.5)
            after = await _snapshot(server)
        await trio.sleep(args.settle_s)
        after = await _snapshot(server)
        growth = (opened["rss_kib"] or 0) - (before["rss_kib"] or 0)
        row = {
            "server": kind, "connections_asked": k, "connected": connected,
            "still_open_at_close": sum(c["open_before_close"] for c in closed),
            "dropped_while_idle": sum(c["dropped_while_idle"] for c in closed),
            "client_close_errors": sum(c["close_errors"] for c in closed),
            "close_s": round(max(c["close_s"] for c in closed), 2),
            "connect_s": round(connect_s, 2), "connects_per_s": round(connected / connect_s, 1) if connect_s else None,
            "rss_mib": {"before": round(before["rss_kib"] / 1024, 1), "open": round(opened["rss_kib"] / 1024, 1),
                        "after_close": round(after["rss_kib"] / 1024, 1), "hwm": opened["hwm_mib"]},
            "rss_per_connection_kib": round(growth / connected, 2) if connected else None,
            "fds": {"before": before["fds"], "open": opened["fds"], "after_close": after["fds"]},
            "readyz_connections": {"before": before["connections"], "open": opened["connections"],
                                   "after_close": after["connections"]},
            "readyz_users_after_close": after["users"],
            "server_nofile": server_nofile,
            "client_nofile": ready[0]["nofile"] if ready else None,
            "client_processes": len(ready),
            "machine_busy": machine_busy,
            "errors": errors,
        }
        if warn:
            row["warning"] = warn
        print(f"{kind}: {row['rss_per_connection_kib']} KiB/connection  rss {row['rss_mib']}  "
              f"fds {row['fds']}  readyz {row['readyz_connections']}", file=sys.stderr, flush=True)
        return row
    finally:
        _servers.stop(server)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    limit = _spawn.raise_nofile()
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-idle-"))
    rows: dict[str, dict[str, Any]] = {}
    for kind in args.servers:
        rows[kind] = await _one(kind, args, secret, log_dir)
        await trio.sleep(2)  # let the loopback sockets of the last one leave TIME_WAIT bookkeeping behind
    summary: dict[str, Any] = {kind: {"rss_per_connection_kib": r["rss_per_connection_kib"],
                                      "connected": r["connected"],
                                      "connections_left_after_close": r["readyz_connections"]["after_close"],
                                      "fds_left_after_close": (r["fds"]["after_close"] or 0) - (r["fds"]["before"] or 0)}
                               for kind, r in rows.items()}
    if "netra" in rows and "peer" in rows and rows["peer"]["rss_per_connection_kib"]:
        summary["ratio_netra_peer"] = round(rows["netra"]["rss_per_connection_kib"] / rows["peer"]["rss_per_connection_kib"], 3)
    if "netra" in rows and "floor" in rows and rows["floor"]["rss_per_connection_kib"]:
        summary["ratio_netra_floor"] = round(rows["netra"]["rss_per_connection_kib"] / rows["floor"]["rss_per_connection_kib"], 3)
    return {
        "meta": {"connections": args.connections, "connect_concurrency": args.connect_concurrency,
                 "processes": args.processes, "warmup": args.warmup, "settle_s": args.settle_s,
                 "bench_nofile": list(limit), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "summary": summary,
        "servers": rows,
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        trio.run(_worker, json.loads(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10000, help="idle connections per server (one user each)")
    p.add_argument("--connect-concurrency", type=int, default=200, help="connects in flight, all processes")
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--warmup", type=int, default=20, help="connections opened and closed before 'before'")
    p.add_argument("--settle-s", type=float, default=3.0, help="wait before each RSS reading")
    p.add_argument("--drain-s", type=float, default=30.0, help="longest wait for the server to see the closes")
    p.add_argument("--servers", nargs="+", default=["netra", "peer", "floor"], choices=["netra", "peer", "floor"])
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    args.processes = max(1, min(args.processes, math.ceil(args.connections / 100)))
    out = trio.run(_bench, args)
    _spawn.write_result(out, args.json)
    ok = all(r["connected"] == args.connections and not r["readyz_connections"]["after_close"]
             for r in out["servers"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
