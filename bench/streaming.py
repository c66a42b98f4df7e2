"""``python -m bench.streaming``: delta latency of long streamed answers at increasing concurrency.

Every run's scripted model streams its answer in ``--chunks`` text_delta
events (``[[stream:N]]``), waiting ``--delay-ms`` before each (same delay for
every server). At each concurrency level C, C connections (one user each) run
``--runs-per-user`` such runs one after the other, their first start spread
evenly at random over one run's length so that about C runs stream at once.
Servers alternate within each level (netra, peer, floor, rotated per level).

For each text_delta the client records, at arrival (after JSON parsing):

- ``delta_ms`` = arrival wall clock - the event's ``ts`` (epoch ms; the same
  clock: everything is on this machine). Both netra and the reference
  servers stamp ``ts`` just before writing the frame, so this is the
  server-write-to-client-read path (socket + client queueing);
- ``lateness_ms`` = arrival - when the chunk was due: the ``ts`` of the
  run's last ``agent_thinking`` (the model starts streaming) + k x delay for
  chunk k. It includes the server's own scheduling slip, which ``delta_ms``
  does not, and accumulates over the run (each chunk waits ``delay`` after the
  previous one was produced, so any slip carries forward);
- ``gap_ms`` = arrival of a delta - arrival of the previous delta of the same
  run, to compare with the set rate (``delay_ms``).

A server stops climbing after the first level whose delta_ms p99 exceeds
``--stop-ms`` (1 s). The summary gives, per server, the largest level whose
delta_ms p99 (and all lower levels') stays under ``--slo-ms`` (100 ms), the
same for lateness_ms, and the ratio netra/peer of those levels.

The reference servers' shared script (bench/peers/_script.py) streams a fixed
4 chunks and ignores ``[[stream:N]]``; this bench therefore starts the peer
and the floor through a two-line launcher that sets that script's CHUNKS to
``--chunks`` before running the unmodified server file (netra honours the
marker itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

from . import _servers, _spawn
from ._client import SUBPROTOCOL, mint_token
from .load import LineReader, percentile

LEVELS = (10, 50, 100, 200, 400, 800)
_LAUNCH = (
    "import os, runpy, sys\n"
    "path = sys.argv[1]\n"
    "sys.path.insert(0, os.path.dirname(path))\n"
    "import _script\n"
    "_script.CHUNKS = int(os.environ['BENCH_STREAM_CHUNKS'])\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(path, run_name='__main__')\n"
)


def start_server(kind: str, *, secret: str, delay_ms: float, log_dir: Path, chunks: int,
                 max_conns: int) -> _servers.Server:
    if kind == "netra":
        big = str(max(100000, max_conns * 4))
        return _servers.start("netra", secret=secret, delay_ms=delay_ms, log_dir=log_dir, netra_forced={
            "NETRA_MAX_CONNECTIONS": str(max_conns + 100), "NETRA_MAX_RUNS": big,
            "NETRA_MAX_MODEL_CALLS": big, "NETRA_MAX_QUEUED_RUNS": big})
    # as _servers.start, through the launcher that makes the shared script stream `chunks` chunks
    port = _servers.free_port()
    env = dict(os.environ)
    env.update({"NETRA_JWT_SECRET": secret, "NETRA_SCRIPTED_DELAY_MS": str(delay_ms),
                "BENCH_STREAM_CHUNKS": str(chunks),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(_servers.ROOT), os.environ.get("PYTHONPATH")]))})
    script = _servers.command(kind, port)[1]
    log_path = log_dir / f"{kind}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, script, "--host", _servers.HOST, "--port", str(port)],
                                cwd=_servers.ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_servers.pdeathsig)
    return _servers.Server(kind, port, proc, log_path)


# --------------------------------------------------------------------------
# worker process


async def _worker(spec: dict[str, Any]) -> None:
    _spawn.raise_nofile()
    secret = os.environ["NETRA_JWT_SECRET"]
    delay, chunks, runs = spec["delay_ms"], spec["chunks"], spec["runs_per_user"]
    question = ("streaming benchmark question " * 40)[: max(120, min(480, 3 * chunks))]
    text = f"{question} [[stream:{chunks}]]"
    stdin = LineReader(trio.lowlevel.FdStream(os.dup(0)))
    delta_ms: list[float] = []
    lateness_ms: list[float] = []
    gap_ms: list[float] = []
    stats = {"connected": 0, "connect_failures": 0, "runs_ok": 0, "runs_failed": 0,
             "short_runs": 0, "errors": {}}

    def err(key: str) -> None:
        stats["errors"][key] = stats["errors"].get(key, 0) + 1

    with trio.fail_after(spec["deadline_s"]):
        async with trio.open_nursery() as conns:
            limiter = trio.CapacityLimiter(spec["connect_concurrency"])
            sockets: list[Any] = []

            async def connect(n: int) -> None:
                async with limiter:
                    sub = f"stream-{spec['prefix']}-u{n}"
                    headers = [(b"authorization", f"Bearer {mint_token(secret, sub)}".encode())]
                    try:
                        with trio.fail_after(30):
                            ws = await connect_websocket_url(conns, spec["url"], subprotocols=[SUBPROTOCOL],
                                                             extra_headers=headers)
                            first = json.loads(await ws.get_message())
                    except Exception as exc:  # noqa: BLE001
                        stats["connect_failures"] += 1
                        err(f"connect:{type(exc).__name__}")
                        return
                    if first.get("type") != "connected":
                        err("first_frame_not_connected")
                    stats["connected"] += 1
                    sockets.append(ws)

            t0 = time.monotonic()
            async with trio.open_nursery() as nursery:
                for n in range(spec["first_user"], spec["first_user"] + spec["users"]):
                    nursery.start_soon(connect, n)
            _spawn.emit("READY", {"connected": stats["connected"], "connect_s": time.monotonic() - t0})
            if (await stdin.readline()).strip() != "GO":
                raise RuntimeError("expected GO")
            cpu0, t_start = _spawn.cpu_self(), time.monotonic()
            spread_s = chunks * delay / 1000

            async def user(ws: Any, k: int) -> None:
                await trio.sleep(random.uniform(0, spread_s))
                for r in range(runs):
                    await ws.send_message(json.dumps({"type": "user_message", "id": f"{k}-{r}-{uuid.uuid4().hex[:8]}",
                                                      "text": text}))
                    anchor: float | None = None
                    prev: float | None = None
                    got = 0
                    done = None
                    with trio.move_on_after(spec["run_timeout_s"]):
                        while done is None:
                            raw = await ws.get_message()
                            now = time.time() * 1000
                            ev = json.loads(raw)
                            kind = ev.get("type")
                            if kind == "text_delta":
                                got += 1
                                ts = ev.get("ts", now)
                                delta_ms.append(round(now - ts, 2))
                                if anchor is not None:
                                    lateness_ms.append(round(now - (anchor + got * delay), 2))
                                if prev is not None:
                                    gap_ms.append(round(now - prev, 2))
                                prev = now
                            elif kind == "agent_thinking":
                                anchor = ev.get("ts")
                            elif kind in ("agent_completed", "agent_error", "agent_cancelled", "error"):
                                done = ev
                    if done is None:
                        stats["runs_failed"] += 1
                        err("run_timeout")
                        return
                    if done.get("type") != "agent_completed":
                        stats["runs_failed"] += 1
                        err(f"{done.get('type')}:{done.get('code') or done.get('reason')}")
                        continue
                    stats["runs_ok"] += 1
                    if got != chunks:
                        stats["short_runs"] += 1

            async def guarded(ws: Any, k: int) -> None:
                try:
                    await user(ws, k)
                except ConnectionClosed:
                    stats["runs_failed"] += 1
                    err("disconnect")

            async with trio.open_nursery() as nursery:
                for k, ws in enumerate(sockets):
                    nursery.start_soon(guarded, ws, k)
            t_end = time.monotonic()
            _spawn.emit("RESULT", {"stats": stats, "delta_ms": delta_ms, "lateness_ms": lateness_ms,
                                   "gap_ms": gap_ms, "cpu_s": _spawn.cpu_self() - cpu0, "wall_s": t_end - t_start})
            with trio.move_on_after(5):
                async with trio.open_nursery() as nursery:
                    for ws in sockets:
                        nursery.start_soon(ws.aclose)
            conns.cancel_scope.cancel()


# --------------------------------------------------------------------------
# parent


async def _level(server: _servers.Server, conc: int, args: argparse.Namespace, secret: str) -> dict[str, Any]:
    procs = max(1, min(args.processes, math.ceil(conc / 25)))
    run_s = args.chunks * args.delay_ms / 1000
    deadline = 120 + run_s * (args.runs_per_user + 1) * 20
    specs, first = [], 1
    for i, count in enumerate(_spawn.split(conc, procs)):
        specs.append({"url": server.url, "prefix": f"{server.kind}-{conc}-{os.getpid()}", "first_user": first,
                      "users": count, "chunks": args.chunks, "delay_ms": args.delay_ms,
                      "runs_per_user": args.runs_per_user, "connect_concurrency": max(1, 100 // procs),
                      "run_timeout_s": max(30.0, run_s * 20), "deadline_s": deadline})
        first += count
    workers: list[Any] = []
    try:
        workers = await _spawn.spawn("bench.streaming", specs, secret)
        with trio.fail_after(120):
            ready = [await _spawn.expect(r, "READY") for _, r in workers]
        srv0, busy = _servers.cpu_seconds(server.proc.pid), _spawn.MachineBusy()
        for proc, _ in workers:
            await proc.stdin.send_all(b"GO\n")
        with trio.fail_after(deadline):
            results = [await _spawn.expect(r, "RESULT") for _, r in workers]
        srv1, machine_busy = _servers.cpu_seconds(server.proc.pid), busy.stop()
    finally:
        await _spawn.reap(workers)
    delta = [x for r in results for x in r["delta_ms"]]
    late = [x for r in results for x in r["lateness_ms"]]
    gaps = [x for r in results for x in r["gap_ms"]]
    wall = max(r["wall_s"] for r in results)
    st: dict[str, Any] = {"connected": 0, "connect_failures": 0, "runs_ok": 0, "runs_failed": 0, "short_runs": 0}
    errors: dict[str, int] = {}
    for r in results:
        for key in st:
            st[key] += r["stats"][key]
        for key, n in r["stats"]["errors"].items():
            errors[key] = errors.get(key, 0) + n
    return {
        "server": server.kind, "concurrency": conc, "client_processes": procs, **st,
        "runs_expected": conc * args.runs_per_user,
        "deltas": len(delta),
        "delta_ms": {"p50": percentile(delta, 50), "p99": percentile(delta, 99), "max": percentile(delta, 100)},
        "lateness_ms": {"p50": percentile(late, 50), "p99": percentile(late, 99), "max": percentile(late, 100)},
        "gap_ms": {"set": args.delay_ms, "mean": round(sum(gaps) / len(gaps), 2) if gaps else None,
                   "p50": percentile(gaps, 50), "p99": percentile(gaps, 99)},
        "deltas_per_s": round(len(delta) / wall, 1) if wall > 0 else None,
        "wall_s": round(wall, 2),
        "connect_s": round(max(r["connect_s"] for r in ready), 2),
        "server_busy": None if srv0 is None or srv1 is None else round((srv1 - srv0) / wall, 3),
        "client_busy_max": round(max(r["cpu_s"] / max(r["wall_s"], 1e-9) for r in results), 3),
        "machine_busy": machine_busy,
        "errors": errors,
    }


def _largest_under(rows: list[dict[str, Any]], key: str, slo: float) -> int:
    best = 0
    for row in sorted(rows, key=lambda r: r["concurrency"]):
        p99 = row[key]["p99"]
        if p99 is None or p99 >= slo or row["runs_failed"] or row["connect_failures"]:
            break
        best = row["concurrency"]
    return best


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    _spawn.raise_nofile()
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-streaming-"))
    kinds = [k for k in ("netra", "peer", "floor") if k in args.servers]
    levels = sorted(args.levels)
    servers: dict[str, _servers.Server] = {}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    stopped: set[str] = set()
    t0 = time.monotonic()
    try:
        for kind in kinds:
            servers[kind] = start_server(kind, secret=secret, delay_ms=args.delay_ms, log_dir=log_dir,
                                         chunks=args.chunks, max_conns=max(levels))
        for server in servers.values():
            await _servers.wait_ready(server)
        for i, conc in enumerate(levels):
            order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
            for kind in order:
                if kind in stopped:
                    continue
                if time.monotonic() - t0 > args.max_minutes * 60:
                    print(f"time budget of {args.max_minutes} min spent: stopping", file=sys.stderr)
                    stopped.update(kinds)
                    break
                row = await _level(servers[kind], conc, args, secret)
                rows[kind].append(row)
                print(f"{kind:>6} c={conc:<4} delta p50 {row['delta_ms']['p50']} p99 {row['delta_ms']['p99']} ms  "
                      f"late p99 {row['lateness_ms']['p99']}  gap mean {row['gap_ms']['mean']} "
                      f"(set {args.delay_ms})  runs {row['runs_ok']}/{row['runs_expected']}  "
                      f"client {row['client_busy_max']} machine {row['machine_busy']}",
                      file=sys.stderr, flush=True)
                if (row["delta_ms"]["p99"] or 0) > args.stop_ms or row["runs_failed"] > row["runs_expected"] // 2:
                    stopped.add(kind)
                await trio.sleep(1)
    finally:
        for server in servers.values():
            _servers.stop(server)
    summary: dict[str, Any] = {}
    for kind, krows in rows.items():
        summary[kind] = {
            "max_concurrency_delta_p99_under_slo": _largest_under(krows, "delta_ms", args.slo_ms),
            "max_concurrency_lateness_p99_under_slo": _largest_under(krows, "lateness_ms", args.slo_ms),
            "levels_run": [r["concurrency"] for r in krows],
            "failures": sum(r["runs_failed"] + r["connect_failures"] for r in krows),
        }
    if "netra" in summary and "peer" in summary:
        for key in ("max_concurrency_delta_p99_under_slo", "max_concurrency_lateness_p99_under_slo"):
            peer = summary["peer"][key]
            summary[f"ratio_netra_peer_{key.removeprefix('max_concurrency_')}"] = (
                round(summary["netra"][key] / peer, 3) if peer else None)
    return {
        "meta": {"chunks": args.chunks, "delay_ms": args.delay_ms, "runs_per_user": args.runs_per_user,
                 "levels": levels, "slo_ms": args.slo_ms, "stop_ms": args.stop_ms, "processes": args.processes,
                 "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "note": "peer/floor stream --chunks chunks via a launcher patching bench/peers/_script.CHUNKS"},
        "summary": summary,
        "levels": rows,
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        trio.run(_worker, json.loads(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=50, help="text_delta chunks per run ([[stream:N]])")
    p.add_argument("--delay-ms", type=float, default=20.0, help="NETRA_SCRIPTED_DELAY_MS: wait before each chunk")
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent streaming runs")
    p.add_argument("--runs-per-user", type=int, default=2, help="runs each connection makes, one after another")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 target for the headline figure")
    p.add_argument("--stop-ms", type=float, default=1000.0, help="a server stops climbing past this p99")
    p.add_argument("--processes", type=int, default=2, help="client processes (at most one per 25 connections)")
    p.add_argument("--servers", nargs="+", default=["netra", "peer", "floor"], choices=["netra", "peer", "floor"])
    p.add_argument("--max-minutes", type=float, default=20.0, help="stop starting levels after this long")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    out = trio.run(_bench, args)
    _spawn.write_result(out, args.json)
    return 0 if all(s["failures"] == 0 for s in out["summary"].values() if isinstance(s, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
