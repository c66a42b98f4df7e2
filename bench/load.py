"""The load generator: one scenario = N users split across client processes.

Why several processes: trio-websocket tops out near one core at roughly
1,300-1,600 messages/s, so a single client process would measure itself, not
the server. Each worker process (``python -m bench.load --worker SPEC``)
opens its share of the connections, paced by a CapacityLimiter so the
server's listen backlog is never what is measured, and reports ``READY``.
Only when every worker is ready does the parent send ``GO`` to all of them:
the timed phase never includes connection opening. Each worker then reports
``RESULT`` (its tally, raw latencies, its CPU time during the timed phase,
and its monotonic start/end, comparable across processes on Linux), and the
parent merges them into one figure set.

Worker protocol, one JSON document per line on the worker's stdout:
``READY {...}`` -> parent writes ``GO`` on stdin -> ``RESULT {...}``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers
from ._client import Tally, User, mint_token
from ._servers import cpu_seconds, machine_cpu

ROOT = Path(__file__).resolve().parent.parent


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(tag: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(payload, separators=(',', ':'))}\n")
    sys.stdout.flush()


class LineReader:
    """Lines from a trio ReceiveStream (a worker's stdout or our stdin)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                raise EOFError("stream closed before a full line")
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line.decode()


# --------------------------------------------------------------------------
# worker process


async def _exit_when_orphaned(stdin: LineReader) -> None:
    """The parent holds our stdin open: EOF means it is gone, so stop (a
    parent-death signal would not do: trio spawns from a worker thread, and
    Linux sends that signal when the spawning *thread* exits)."""
    try:
        while True:
            await stdin.readline()
    except EOFError:
        os._exit(3)  # nobody is left to read our figures


async def _worker(spec: dict[str, Any]) -> None:
    secret = os.environ["NETRA_JWT_SECRET"]
    first, count, messages = spec["first_user"], spec["users"], spec["messages"]
    tally = Tally(users=count, runs_attempted=count * messages)
    users = [User(sub=f"{spec['prefix']}-u{n}", user_no=n, tally=tally) for n in range(first, first + count)]
    stdin = LineReader(trio.lowlevel.FdStream(os.dup(0)))
    with trio.fail_after(spec["deadline_s"]):
        async with trio.open_nursery() as connections:  # hosts every connection's reader task
            limiter = trio.CapacityLimiter(spec["connect_concurrency"])

            async def connect(user: User) -> None:
                async with limiter:
                    token = mint_token(secret, user.sub)
                    await user.connect(connections, spec["url"], token, spec["connect_timeout_s"])

            t0 = time.monotonic()
            async with trio.open_nursery() as nursery:
                for user in users:
                    nursery.start_soon(connect, user)
            emit("READY", {"connected": tally.connected, "connect_s": time.monotonic() - t0})
            with trio.fail_after(spec["go_timeout_s"]):
                if (await stdin.readline()).strip() != "GO":
                    raise RuntimeError("expected GO")
            cpu0, t_start = cpu_self(), time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_exit_when_orphaned, stdin)
                async with trio.open_nursery() as runs:
                    for user in users:
                        if user.ws is not None:
                            runs.start_soon(user.run_messages, messages, spec["run_timeout_s"])
                nursery.cancel_scope.cancel()  # stop the watchdog
            t_end = max((u.finished_at for u in users), default=0.0) or time.monotonic()
            cpu = cpu_self() - cpu0
            tally.ttfe_ms = [round(x, 3) for x in tally.ttfe_ms]
            tally.ttc_ms = [round(x, 3) for x in tally.ttc_ms]
            emit("RESULT", {"tally": tally.to_json(), "cpu_s": cpu, "t_start": t_start, "t_end": t_end})
            with trio.move_on_after(5):
                async with trio.open_nursery() as nursery:
                    for user in users:
                        if user.ws is not None:
                            nursery.start_soon(user.ws.aclose)
            connections.cancel_scope.cancel()


# --------------------------------------------------------------------------
# parent side


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every figure was measured)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2)


def _split(users: int, processes: int) -> list[int]:
    base, extra = divmod(users, processes)
    return [base + (i < extra) for i in range(processes)]


async def run_scenario(
    *,
    name: str,
    url: str,
    users: int,
    messages: int,
    processes: int,
    secret: str,
    server_pid: int | None,
    run_timeout_s: float = 60.0,
    connect_concurrency: int = 100,
    timeout_s: float = 600.0,
    nice: int = 0,
) -> dict[str, Any]:
    """Run one scenario against ``url`` and return its merged figures
    (``nice``: the client processes' niceness, see _servers.client_options)."""
    procs = max(1, min(processes, users))
    connect_timeout_s = 30.0
    connect_phase_s = 60.0 + users * connect_timeout_s / connect_concurrency
    env = {**os.environ, "NETRA_JWT_SECRET": secret,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    workers: list[trio.Process] = []
    first = 1
    try:
        for i, count in enumerate(_split(users, procs)):
            spec = {"url": url, "prefix": f"bench-{name}-{os.getpid()}", "first_user": first, "users": count,
                    "messages": messages, "run_timeout_s": run_timeout_s,
                    "connect_concurrency": max(1, connect_concurrency // procs),
                    "connect_timeout_s": connect_timeout_s, "go_timeout_s": connect_phase_s + 30,
                    "deadline_s": connect_phase_s + timeout_s + 60}
            first += count
            workers.append(await trio.lowlevel.open_process(
                [sys.executable, "-m", "bench.load", "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(ROOT),
                **_servers.client_options(nice)))
        readers = [LineReader(w.stdout) for w in workers]
        ready = []
        with trio.fail_after(connect_phase_s):
            for reader in readers:
                tag, _, body = (await reader.readline()).partition(" ")
                if tag != "READY":
                    raise RuntimeError(f"worker said {tag!r} instead of READY")
                ready.append(json.loads(body))
        srv0, machine0 = cpu_seconds(server_pid), machine_cpu()
        for worker in workers:
            await worker.stdin.send_all(b"GO\n")
        results = []
        with trio.fail_after(timeout_s):
            for reader in readers:
                tag, _, body = (await reader.readline()).partition(" ")
                if tag != "RESULT":
                    raise RuntimeError(f"worker said {tag!r} instead of RESULT")
                results.append(json.loads(body))
        srv1, machine1 = cpu_seconds(server_pid), machine_cpu()
        with trio.move_on_after(15):
            for worker in workers:
                await worker.wait()
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
            with trio.move_on_after(5):
                await worker.wait()
    machine = (machine1[0] - machine0[0], machine1[1] - machine0[1])
    return _summary(name, users, messages, procs, ready, results, srv0, srv1, machine)


def _summary(name: str, users: int, messages: int, procs: int, ready: list[dict[str, Any]],
             results: list[dict[str, Any]], srv0: float | None, srv1: float | None,
             machine: tuple[float, float]) -> dict[str, Any]:
    tally = Tally()
    for result in results:
        tally.add(result["tally"])
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    wall = max(wall, 1e-9)
    client_cpu = sum(r["cpu_s"] for r in results)
    busy = [r["cpu_s"] / max(r["t_end"] - r["t_start"], 1e-9) for r in results]
    server_cpu = None if srv0 is None or srv1 is None else round(srv1 - srv0, 3)
    attempted = tally.runs_attempted
    return {
        "scenario": name,
        "users": users,
        "messages_per_user": messages,
        "client_processes": procs,
        "connected": tally.connected,
        "runs_attempted": attempted,
        "runs_sent": tally.runs_sent,
        "runs_succeeded": tally.runs_succeeded,
        "success_rate": round(tally.runs_succeeded / attempted, 4) if attempted else None,
        "event_delivery": round(tally.runs_five_in_order / attempted, 4) if attempted else None,
        "cross_user_events": tally.cross_user_events,
        "runs_per_s": round(tally.runs_succeeded / wall, 1),
        "events_per_s": round(tally.events_received / wall, 1),
        "ttfe_ms": {"p50": percentile(tally.ttfe_ms, 50), "p99": percentile(tally.ttfe_ms, 99)},
        "ttc_ms": {"p50": percentile(tally.ttc_ms, 50), "p99": percentile(tally.ttc_ms, 99)},
        "client_cpu_s": round(client_cpu, 3),
        "server_cpu_s": server_cpu,
        "wall_s": round(wall, 3),
        "connect_s": round(max(r["connect_s"] for r in ready), 3),
        "client_busy_max": round(max(busy), 3),
        "server_busy": None if server_cpu is None else round(server_cpu / wall, 3),
        "machine_busy": round(machine[0] / machine[1], 3) if machine[1] > 0 else None,
        "other_cpu_s": None if server_cpu is None or machine[1] <= 0 else round(max(0.0, machine[0] - client_cpu - server_cpu), 3),
        "client_bottleneck": max(busy) >= 0.85,
        "violations": {
            "seq_errors": tally.seq_errors,
            "text_mismatches": tally.text_mismatches,
            "args_mismatches": tally.args_mismatches,
            "tool_pairing_errors": tally.tool_pairing_errors,
            "events_after_terminal": tally.events_after_terminal,
            "run_timeouts": tally.run_timeouts,
            "connect_failures": tally.connect_failures,
            "disconnects": tally.disconnects,
        },
        "errors": dict(tally.errors),
        "close_codes": dict(tally.close_codes),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            trio.run(_worker, json.loads(sys.argv[2]))
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
            sys.exit(130)
    else:
        sys.exit("bench.load is the worker of `python -m bench`; run that instead (see bench/README.md)")


if __name__ == "__main__":
    main()
