"""``python -m bench.idle``: server memory per idle authenticated WebSocket connection.

For each server in turn (netra, the FastAPI peer, the raw floor; one server
process alive at a time, so none is measured while another is being loaded),
the bench:

1. starts it with an open-file limit above ``--connections`` and opens and
   closes ``--warmup`` connections, so one-time costs (lazy imports,
   first-request caches) are not charged to connections;
2. reads its RSS (``/proc/PID/status`` VmRSS) = "before";
3. opens ``--connections`` connections (one user each, bearer token),
   at most ``--connect-concurrency`` in flight, spread over ``--processes``
   client processes of the raw-socket client (bench/_rawclient.py: a few
   hundred bytes per connection on the client's side, no task per
   connection), each waiting for its ``connected`` event. Each connection
   comes from the next local address of 127.0.0.2 ... 127.0.0.N
   (``--source-addresses``), so that tens of thousands of connections to
   one server port do not exhaust the ephemeral ports of one address;
4. waits ``--settle-s``, reads RSS again = "open";
5. closes every connection from the client side (close frame, then the
   socket), waits, and reads RSS, open file descriptors and, for netra,
   /readyz ``connections``;
6. does 2 to 5 again, ``--cycles`` times in all (default 2): memory freed
   inside the process is seldom given back to the OS, so RSS after closing
   stays up; a second cycle whose open RSS is about the first's shows it
   was reused, not leaked.

``rss_per_connection_kib`` = (open - before) / connections actually open.
Nothing is sent on the idle connections (netra's heartbeat pings, which the
client answers, still run: that is part of an idle connection's life).
The client processes and the server raise RLIMIT_NOFILE as far as they
may (above the hard limit when run as root).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers, _spawn
from .hotpath import netra_source


# --------------------------------------------------------------------------
# parent


async def _connect_batch(server: _servers.Server, n: int, procs: int, concurrency: int, secret: str,
                         tag: str, sources: int = 0, nice: int = 0) -> tuple[list[Any], list[dict[str, Any]]]:
    specs, first = [], 1
    connect_phase_s = 120 + n * 30 / max(1, concurrency)
    addresses = [f"127.0.0.{i}" for i in range(2, 2 + sources)] or None
    for count in _spawn.split(n, procs):
        specs.append({"mode": "idle", "host": _servers.HOST, "port": server.port, "prefix": f"{tag}-{os.getpid()}",
                      "first_user": first, "users": count, "sources": addresses,
                      "connect_concurrency": max(1, concurrency // procs), "connect_phase_s": connect_phase_s,
                      "close_timeout_s": 60.0, "hold_timeout_s": connect_phase_s + 3600})
        first += count
    workers = await _spawn.spawn("bench._rawclient", specs, secret, nice)
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


def _sum_counts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, n in d.items():
            out[key] = out.get(key, 0) + n
    return out


async def _snapshot(server: _servers.Server) -> dict[str, Any]:
    pid = server.proc.pid
    ready = await _spawn.readyz(server)
    return {"rss_kib": (_servers.status_kib(pid, "VmRSS") or {}).get("VmRSS"), "fds": _servers.fd_count(pid),
            "connections": None if ready is None else ready.get("connections"),
            "users": None if ready is None else ready.get("users")}


async def _one(kind: str, args: argparse.Namespace, secret: str, log_dir: Path) -> dict[str, Any]:
    k = args.connections
    server = _servers.start(kind, secret=secret, delay_ms=0.0, log_dir=log_dir, netra_forced={
        "NETRA_MAX_CONNECTIONS": str(k + args.warmup + 1000)}, nofile=k + args.warmup + 1000,
        netra_root=args.netra_root, nice=args.nice)
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

        async def cycle(no: int) -> dict[str, Any]:
            before = await _snapshot(server)
            busy = _spawn.MachineBusy()
            t0 = time.monotonic()
            workers, ready = await _connect_batch(server, k, args.processes, args.connect_concurrency, secret,
                                                  f"{kind}-c{no}", sources=args.source_addresses, nice=args.nice)
            connect_s = time.monotonic() - t0
            connected = sum(r["open"] for r in ready)
            errors: dict[str, int] = {}
            for r in ready:
                for key, n in r["errors"].items():
                    errors[key] = errors.get(key, 0) + n
            print(f"{kind}: cycle {no}: {connected}/{k} open in {connect_s:.1f} s", file=sys.stderr, flush=True)
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
                "client_close_errors": _sum_counts(c["errors"] for c in closed),
                "close_codes": _sum_counts(c["close_codes"] for c in closed),
                "server_pings_answered": sum(c["pings"] for c in closed),
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
            print(f"{kind}: cycle {no}: {row['rss_per_connection_kib']} KiB/connection  rss {row['rss_mib']}  "
                  f"fds {row['fds']}  readyz {row['readyz_connections']}", file=sys.stderr, flush=True)
            return row

        rows = [await cycle(no) for no in range(1, args.cycles + 1)]
        row = rows[0]
        if args.cycles > 1:
            # memory a closed connection left is reused by the next ones when the open RSS stays put
            row["cycles"] = [{key: r[key] for key in ("connected", "rss_mib", "rss_per_connection_kib", "fds",
                                                      "readyz_connections", "close_codes")} for r in rows]
            row["rss_open_growth_after_first_cycle_mib"] = round(rows[-1]["rss_mib"]["open"]
                                                                 - rows[0]["rss_mib"]["open"], 1)
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
                                      "rss_mib": r["rss_mib"],
                                      "rss_open_mib_each_cycle": [c["rss_mib"]["open"] for c in r.get("cycles", [r])],
                                      "connections_left_after_close": r["readyz_connections"]["after_close"],
                                      "fds_left_after_close": (r["fds"]["after_close"] or 0) - (r["fds"]["before"] or 0)}
                               for kind, r in rows.items()}
    if "netra" in rows and "peer" in rows and rows["peer"]["rss_per_connection_kib"]:
        summary["ratio_netra_peer"] = round(rows["netra"]["rss_per_connection_kib"] / rows["peer"]["rss_per_connection_kib"], 3)
    if "netra" in rows and "floor" in rows and rows["floor"]["rss_per_connection_kib"]:
        summary["ratio_netra_floor"] = round(rows["netra"]["rss_per_connection_kib"] / rows["floor"]["rss_per_connection_kib"], 3)
    return {
        "meta": {"connections": args.connections, "connections_asked": args.connections_asked,
                 "connect_concurrency": args.connect_concurrency,
                 "client": "bench/_rawclient.py", "source_addresses": args.source_addresses,
                 "netra_source": netra_source(args.netra_root or _servers.ROOT) | (
                     {"label": args.netra_label} if args.netra_label else {}), "nice": args.nice,
                 "processes": args.processes, "warmup": args.warmup, "cycles": args.cycles, "settle_s": args.settle_s,
                 "bench_nofile": list(limit), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "summary": summary,
        "servers": rows,
    }


def _nofile_reachable(want: int) -> int:
    """The open-file limit a process started by us can get: ``want`` when
    the hard limit may be raised (CAP_SYS_RESOURCE), else the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want <= hard:
        return want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))  # raising the hard limit: only if we may
    except (ValueError, OSError):
        return hard
    return want


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10000, help="idle connections per server (one user each)")
    p.add_argument("--connect-concurrency", type=int, default=200, help="connects in flight, all processes")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--source-addresses", type=int, default=None,
                   help="client addresses 127.0.0.2 ... (default: one per 20,000 connections, at least 1)")
    p.add_argument("--warmup", type=int, default=20, help="connections opened and closed before 'before'")
    p.add_argument("--cycles", type=int, default=2,
                   help="open, measure and close the connections this many times per server (default: 2): the "
                        "first cycle's figures are reported; the later ones show whether the memory the first "
                        "left behind is reused")
    p.add_argument("--settle-s", type=float, default=3.0, help="wait before each RSS reading")
    p.add_argument("--drain-s", type=float, default=30.0, help="longest wait for the server to see the closes")
    p.add_argument("--servers", nargs="+", default=["netra", "peer", "floor"], choices=["netra", "peer", "floor"])
    p.add_argument("--netra-root", type=Path, default=None,
                   help="run the netra package of this source tree instead of this repository's")
    p.add_argument("--netra-label", help="what the measured netra is (e.g. the commit of an exported tree)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the servers and of the client processes (and their autogroups), e.g. -10 "
                        "on a machine shared with other work (needs CAP_SYS_NICE; default 0)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.netra_root is not None:
        args.netra_root = args.netra_root.resolve()
    asked = args.connections
    reachable = _nofile_reachable(asked + args.warmup + 1000)
    if asked + args.warmup + 1000 > reachable:
        # one server process holds every connection: it cannot hold more than its open-file limit allows
        args.connections = max(1, reachable - args.warmup - 1000)
        print(f"open-file limit: at most {reachable} here (hard limit, and no CAP_SYS_RESOURCE to raise it), so "
              f"one server process can hold {args.connections} connections, not {asked}: measuring "
              f"{args.connections}", file=sys.stderr)
    args.connections_asked = asked
    per_process = max(100, min(_spawn.raise_nofile()) - 200)
    args.processes = max(args.processes, math.ceil(args.connections / per_process))
    args.processes = max(1, min(args.processes, math.ceil(args.connections / 100)))
    if args.source_addresses is None:
        args.source_addresses = max(1, math.ceil(args.connections / 20000))
    args.source_addresses = max(0, min(args.source_addresses, 250))
    out = trio.run(_bench, args)
    _spawn.write_result(out, args.json)
    ok = all(c["connected"] == args.connections and not c["readyz_connections"]["after_close"]
             for r in out["servers"].values() for c in r.get("cycles", [r]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
