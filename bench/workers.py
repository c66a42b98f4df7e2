"""``python -m bench workers``: runs/s of ``netra serve --workers 1`` and ``--workers 2`` on one machine.

netra without a store (``NETRA_DATABASE_URL=none``, the bench's usual
``NETRA_RATE_*`` defaults) is started with ``NETRA_WORKERS=1`` and
``NETRA_WORKERS=2``, alternating (the order flips every round). For each
connection count, the raw load client (bench/_rawclient.py, its ``load``
mode, as ``python -m bench hotpath`` drives it) has every connection send the
golden-path message ``what is [[tool:calculator {"expression": "U*K"}]]``
and the next one the moment the run's ``agent_completed`` arrives (10 events
per run): ``--warmup`` seconds whose runs are checked in full, then
``--duration`` seconds timed.

Nothing is pinned: the workers need both cores, and the client shares them.
So besides runs/s the bench reads, at the timed window's edges, the CPU
seconds of every netra process (the supervisor and its workers; with one
worker, the one process), of the client, and of the whole machine, and
reports runs per server CPU second. The issue's targets: 2 workers reach
>= 1.5x the runs/s of one, and >= 0.9x its runs per server CPU second.

With workers, a connection lives in the worker that accepted it; these
clients never resume, so that never matters here. Each worker gets
ceil(limit / 2) of netra's global caps (docs/deployment.md); the bench
raises ``NETRA_MAX_CONNECTIONS`` so that neither split refuses a connection.

A report goes to stderr, the JSON to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers
from .hotpath import (
    ROOT,
    load_problems,
    Worker,
    _log,
    _pct,
    _settle,
    _sleep_until,
    _split,
    core_busy,
    cpu_lines,
    machine,
    netra_source,
    proc_cpu,
)

TARGET_RUNS = 1.5      # runs/s of 2 workers / runs/s of 1
TARGET_EFFICIENCY = 0.9  # runs per server CPU second of 2 workers / those of 1
PIDS_LINE = re.compile(r"Workers:\s+(\d+), pids ([\d ]+)")


# --------------------------------------------------------------------------
# one server: supervisor + workers


class Netra:
    def __init__(self, server: _servers.Server, workers: int, worker_pids: list[int]) -> None:
        self.server, self.workers, self.worker_pids = server, workers, worker_pids

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def processes(self) -> list[int]:
        """Every live netra process: the supervisor (or the one server) and its descendants."""
        return [p for p in _servers._descendants(self.pid) if os.path.exists(f"/proc/{p}/stat")]


def start(workers: int, args: argparse.Namespace, secret: str, log_dir: Path) -> Netra:
    forced = {"NETRA_DATABASE_URL": "none", "NETRA_WORKERS": str(workers),
              "NETRA_MAX_CONNECTIONS": str(max(10000, 2 * max(args.connections) + 100))}
    log_path = log_dir / f"netra-w{workers}.log"  # appended to by every round: read only this start's part
    log_from = log_path.stat().st_size if log_path.exists() else 0
    server = _servers.start(f"netra-w{workers}", secret=secret, delay_ms=0.0, log_dir=log_dir,
                            netra_forced=forced, netra_root=args.netra_root,
                            nofile=max(args.connections) * 2 + 1000, nice=args.nice)
    try:
        trio.run(_servers.wait_ready, server)
        pids: list[int] = []
        if workers > 1:
            # /healthz answers once one worker listens; the supervisor prints the pids once all do.
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline:
                with open(server.log_path, "rb") as f:
                    f.seek(log_from)
                    m = PIDS_LINE.search(f.read().decode(errors="replace"))
                if m:
                    pids = [int(x) for x in m.group(2).split()]
                    break
                if server.proc.poll() is not None:
                    raise RuntimeError(f"supervisor exited with {server.proc.returncode}:\n{server.log_tail()}")
                time.sleep(0.1)
            if len(pids) != workers or int(m.group(1)) != workers:
                raise RuntimeError(f"{workers} workers not all listening within 60 s:\n{server.log_tail()}")
            children = set(_servers._descendants(server.proc.pid)) - {server.proc.pid}
            if not set(pids) <= children:
                raise RuntimeError(f"workers {pids} are not the supervisor's children {sorted(children)}")
        return Netra(server, workers, pids)
    except BaseException:
        _stop(Netra(server, workers, []))
        raise


def _stop(netra: Netra) -> None:
    """SIGTERM to the supervisor (it drains its workers), then SIGKILL any
    netra process of ours still alive: workers are in process groups of
    their own, which _servers.stop's killpg does not reach."""
    ours = netra.processes()
    _servers.stop(netra.server)
    for pid in ours:
        if pid != netra.pid and os.path.exists(f"/proc/{pid}/stat"):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# --------------------------------------------------------------------------
# one measurement


def _sockets(pid: int) -> int:
    """Sockets open in ``pid``: the difference before and after the clients
    connect says how the kernel spread the connections (give or take a socket
    of netra's own)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                continue
    except OSError:
        return -1
    return n


def measure(netra: Netra, connections: int, args: argparse.Namespace, secret: str, round_no: int) -> dict[str, Any]:
    pid, port = netra.pid, netra.server.port
    procs = max(1, min(args.client_processes, connections))
    serving = netra.worker_pids or [pid]
    sockets_before = {p: _sockets(p) for p in serving}
    clients: list[Worker] = []
    first = 1
    prefix = f"workers-w{netra.workers}-r{round_no}-c{connections}-{os.getpid()}"
    try:
        for count in _split(connections, procs):
            spec = {"mode": "load", "io": "epoll", "host": _servers.HOST, "port": port,
                    "prefix": prefix, "first_user": first, "users": count,
                    "connect_concurrency": max(1, 200 // procs), "connect_phase_s": 60.0,
                    "go_timeout_s": 120.0, "drain_timeout_s": args.run_timeout, "close_timeout_s": 5.0}
            first += count
            clients.append(Worker(spec, args.cpus, secret, args.nice))
        ready = [c.expect("READY", 90.0) for c in clients]
        opened = sum(r["open"] for r in ready)
        per_worker_conns = {p: _sockets(p) - sockets_before[p] for p in serving}
        t_go = time.monotonic() + 0.2
        t_warm = t_go + args.warmup
        t_stop = t_warm + args.duration
        for c in clients:
            c.send(f"GO {t_go!r} {t_warm!r} {t_stop!r}")
        _sleep_until(t_warm)
        a_pids = set(netra.processes())
        a_wall, a_srv, a_cpus = time.monotonic(), proc_cpu(pid), cpu_lines()
        a_each = {p: proc_cpu(p, tree=False) for p in serving}
        a_cli = [proc_cpu(c.proc.pid, tree=False) for c in clients]
        _sleep_until(t_stop)
        b_wall, b_srv, b_cpus = time.monotonic(), proc_cpu(pid), cpu_lines()
        b_each = {p: proc_cpu(p, tree=False) for p in serving}
        b_cli = [proc_cpu(c.proc.pid, tree=False) for c in clients]
        b_pids = set(netra.processes())
        results = [c.expect("RESULT", args.run_timeout + 30.0) for c in clients]
    finally:
        for c in clients:
            c.reap()
    wall = max(b_wall - a_wall, 1e-9)
    lat = [x for r in results for x in r["lat"]]
    runs = sum(r["runs"] for r in results)
    events = sum(r["events"] for r in results)
    frames = sum(r["window_frames"] for r in results)
    per_run = events / runs if runs else None
    # As hotpath: throughput from the frames received in the window (runs complete in waves at 1000 connections).
    work = frames / per_run if per_run else 0.0
    srv_cpu = sum(b_srv) - sum(a_srv)
    cli_cpu = sum(sum(b) - sum(a) for a, b in zip(a_cli, b_cli))
    mach = core_busy(a_cpus, b_cpus, set(a_cpus))  # the whole machine, as fractions of all its cores
    ncores = len(a_cpus)
    others = None
    if mach is not None:
        others = round(max(0.0, mach["busy"] - mach["irq"] - mach["softirq"] - (srv_cpu + cli_cpu) / wall / ncores), 3)

    def add(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in results:
            for k, v in r.get(key, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    return {
        "workers": netra.workers, "connections": connections, "round": round_no, "opened": opened,
        "connect_s": max(r["connect_s"] for r in ready),
        "window_s": round(wall, 3), "runs_completed_in_window": runs, "events_received_in_window": frames,
        "runs_per_s": round(work / wall, 1), "completed_runs_per_s": round(runs / wall, 1),
        "events_per_run": round(per_run, 2) if per_run else None,
        "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": _pct(lat, 100)},
        "server_cpu_s": round(srv_cpu, 3),
        "server_cpu_user_sys_s": [round(b_srv[0] - a_srv[0], 3), round(b_srv[1] - a_srv[1], 3)],
        "server_cpu_s_per_worker": [round(sum(b_each[p]) - sum(a_each[p]), 3) for p in serving],
        "new_sockets_per_worker": [per_worker_conns[p] for p in serving],
        "runs_per_server_cpu_s": round(work / srv_cpu, 1) if srv_cpu else None,
        "server_busy_cores": round(srv_cpu / wall, 3),
        "client_cpu_s": round(cli_cpu, 3),
        "client_busy_cores": round(cli_cpu / wall, 3),
        "machine": mach,
        "machine_others": others,
        "netra_processes_same_in_window": a_pids == b_pids,
        "checks": {
            "runs_sent": sum(r["runs_sent"] for r in results),
            "runs_completed": sum(r["runs_completed_all"] for r in results),
            "warmup_runs_checked_ok": sum(r["verified_ok"] for r in results),
            "warmup_check_failures": add("verify_failed"),
            "seq_errors": sum(r["seq_errors"] for r in results),
            "failed_runs": add("failed"),
            "unfinished_at_drain": sum(r["unfinished_at_drain"] for r in results),
            "frames_per_timed_run": add("frames_per_run"),
            "errors": add("errors"), "close_codes": add("close_codes"),
            "connect_errors": {k: v for r in ready for k, v in r["errors"].items()},
        },
    }


# --------------------------------------------------------------------------
# summary and report


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in args.workers:
        for n in args.connections:
            mine = [r for r in rows if r["workers"] == w and r["connections"] == n and "error" not in r]
            if not mine:
                continue
            out[f"{w}@{n}"] = {
                "workers": w, "connections": n, "rounds": len(mine),
                "runs_per_s": _median([r["runs_per_s"] for r in mine]),
                "p50_ms": _median([r["latency_ms"]["p50"] for r in mine]),
                "p99_ms": _median([r["latency_ms"]["p99"] for r in mine]),
                "server_cpu_s": _median([r["server_cpu_s"] for r in mine]),
                "runs_per_server_cpu_s": _median([r["runs_per_server_cpu_s"] for r in mine]),
                "server_busy_cores": _median([r["server_busy_cores"] for r in mine]),
                "client_cpu_s": _median([r["client_cpu_s"] for r in mine]),
                "client_busy_cores": _median([r["client_busy_cores"] for r in mine]),
                "machine_busy": _median([(r["machine"] or {}).get("busy") for r in mine]),
                "machine_softirq": _median([(r["machine"] or {}).get("softirq") for r in mine]),
                "machine_others": _median([r["machine_others"] for r in mine]),
                "runs_per_s_each_round": [r["runs_per_s"] for r in mine],
            }
    return out


def ratios(summary: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if 1 not in args.workers:
        return out
    for w in args.workers:
        if w == 1:
            continue
        for n in args.connections:
            one, many = summary.get(f"1@{n}"), summary.get(f"{w}@{n}")
            if not one or not many:
                continue

            def r(key: str, many: dict[str, Any] = many, one: dict[str, Any] = one) -> float | None:
                a, b = many[key], one[key]
                return round(a / b, 3) if a is not None and b else None

            runs, eff = r("runs_per_s"), r("runs_per_server_cpu_s")
            out[f"{w}/1@{n}"] = {
                "runs_per_s": runs, "runs_per_server_cpu_s": eff, "p99_ms": r("p99_ms"),
                "runs_per_s_target": TARGET_RUNS, "runs_per_s_met": runs is not None and runs >= TARGET_RUNS,
                "runs_per_server_cpu_s_target": TARGET_EFFICIENCY,
                "runs_per_server_cpu_s_met": eff is not None and eff >= TARGET_EFFICIENCY,
            }
    return out


def _problems(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        tag = f"workers {r['workers']} @{r['connections']} round {r['round']}"
        if "error" in r:
            out.append(f"{tag}: {r['error']}")
            continue
        out.extend(load_problems(tag, r))
        c = r["checks"]
        if set(c["close_codes"]) - {"1000"}:
            out.append(f"{tag}: close codes {c['close_codes']}")
        if not r["netra_processes_same_in_window"]:
            out.append(f"{tag}: a netra process started or ended during the timed window (a worker restarted?)")
        if (r["machine_others"] or 0) > 0.05:
            out.append(f"{tag}: other processes (or steal) used {r['machine_others']} of the machine: "
                       f"that round is noisy")
    return out


def report(out: dict[str, Any]) -> None:
    m, meta = out["meta"]["machine"], out["meta"]
    _log()
    _log(f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
         f"Linux {m['kernel']}")
    src = meta["netra_source"]
    what = [src["label"]] if src.get("label") else []
    if src.get("commit"):
        what.append(f"commit {src['commit']}, {len(src.get('uncommitted_netra_files') or [])} uncommitted "
                    f"files under netra/")
    _log(f"netra: {'; '.join(what) or 'commit unknown'} ({src['tree']})")
    _log(f"busy per core before the bench: {meta['busy_per_core_before']}")
    _log(f"nothing pinned (server and client share cpus {meta['cpus']}); {meta['client_processes']} client "
         f"process(es), nice {meta['nice']}; {meta['rounds']} rounds x {meta['duration_s']} s timed "
         f"(+{meta['warmup_s']} s warm-up, checked); workers {meta['workers']} alternating")
    _log()
    _log("per measurement:")
    _log(f"{'workers':>7} {'conns':>6} {'round':>5} {'runs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'srv cpu s':>10} "
         f"{'runs/srv s':>11} {'cli cpu s':>10} {'mach busy':>10} {'others':>7}  per worker: new sockets, cpu s")
    for r in out["rows"]:
        if "error" in r:
            _log(f"{r['workers']:>7} {r['connections']:>6} {r['round']:>5} ERROR {r['error'][:200]}")
            continue
        _log(f"{r['workers']:>7} {r['connections']:>6} {r['round']:>5} {r['runs_per_s']:>9} "
             f"{r['latency_ms']['p50']:>8} {r['latency_ms']['p99']:>8} {r['server_cpu_s']:>10} "
             f"{r['runs_per_server_cpu_s']!s:>11} {r['client_cpu_s']:>10} {(r['machine'] or {}).get('busy')!s:>10} "
             f"{r['machine_others']!s:>7}  {r['new_sockets_per_worker']}, {r['server_cpu_s_per_worker']}")
    _log()
    _log(f"medians over rounds ({meta['duration_s']} s windows):")
    _log(f"{'workers':>7} {'conns':>6} {'runs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'srv cpu s':>10} {'runs/srv s':>11} "
         f"{'srv cores':>10} {'cli cpu s':>10} {'mach busy':>10} {'softirq':>8} {'others':>7}")
    for s in out["summary"].values():
        _log(f"{s['workers']:>7} {s['connections']:>6} {s['runs_per_s']:>9} {s['p50_ms']:>8} {s['p99_ms']:>8} "
             f"{s['server_cpu_s']:>10} {s['runs_per_server_cpu_s']!s:>11} {s['server_busy_cores']:>10} "
             f"{s['client_cpu_s']:>10} {s['machine_busy']!s:>10} {s['machine_softirq']!s:>8} "
             f"{s['machine_others']!s:>7}")
    _log()
    for key, r in out["ratios"].items():
        _log(f"ratio workers {key:<8} runs/s {r['runs_per_s']} (target >= {r['runs_per_s_target']}: "
             f"{'met' if r['runs_per_s_met'] else 'MISSED'})  runs per server cpu s {r['runs_per_server_cpu_s']} "
             f"(target >= {r['runs_per_server_cpu_s_target']}: "
             f"{'met' if r['runs_per_server_cpu_s_met'] else 'MISSED'})  p99 {r['p99_ms']}")
    if out["problems"]:
        _log()
        for p in out["problems"]:
            _log(f"PROBLEM: {p}")


# --------------------------------------------------------------------------
# the bench


def run(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-workers-"))
    _log(f"server logs: {log_dir}")
    a = cpu_lines()
    time.sleep(1.0)
    b = cpu_lines()
    quiet = {str(c): (core_busy(a, b, {c}) or {}).get("busy") for c in sorted(a)}
    _log(f"machine busy per core before the bench (1 s, nothing of ours running): {quiet}")
    # read before the servers start: the tree may move while the bench runs
    source = netra_source(args.netra_root or ROOT) | ({"label": args.netra_label} if args.netra_label else {})
    rows: list[dict[str, Any]] = []
    started = time.time()
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(args.workers)
        for w in args.workers[k:] + args.workers[:k]:
            try:
                netra = start(w, args, secret, log_dir)
            except Exception as exc:  # noqa: BLE001 - the other figures are still worth having
                rows += [{"workers": w, "connections": n, "round": rnd, "error": str(exc)[:500]}
                         for n in args.connections]
                _log(f"round {rnd} workers {w}: could not start: {exc}")
                continue
            try:
                for n in args.connections:
                    try:
                        row = measure(netra, n, args, secret, rnd)
                    except Exception as exc:  # noqa: BLE001
                        row = {"workers": w, "connections": n, "round": rnd,
                               "error": f"{type(exc).__name__}: {exc}"[:500]}
                    rows.append(row)
                    if "error" in row:
                        _log(f"round {rnd} workers {w} {n:>5} conns: ERROR {row['error']}")
                    else:
                        _log(f"round {rnd} workers {w} {n:>5} conns: {row['runs_per_s']:>8} runs/s  "
                             f"p50 {row['latency_ms']['p50']} p99 {row['latency_ms']['p99']} ms  "
                             f"server {row['server_cpu_s']} cpu s ({row['runs_per_server_cpu_s']} runs/cpu s, "
                             f"per worker {row['server_cpu_s_per_worker']}, new sockets {row['new_sockets_per_worker']})  "
                             f"client {row['client_cpu_s']} cpu s  machine busy {(row['machine'] or {}).get('busy')}")
                    _settle(netra.pid)
            finally:
                _stop(netra)
    summary = summarize(rows, args)
    return {
        "meta": {
            "benchmark": "workers",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s_total": round(time.time() - started, 1),
            "machine": machine(),
            "busy_per_core_before": quiet,
            "netra_source": source,
            "workers": args.workers, "connections": args.connections, "rounds": args.rounds,
            "duration_s": args.duration, "warmup_s": args.warmup, "cpus": sorted(args.cpus),
            "client_processes": args.client_processes, "nice": args.nice,
            "targets": {"runs_per_s_ratio": TARGET_RUNS, "runs_per_server_cpu_s_ratio": TARGET_EFFICIENCY},
            "netra_env": {k: v for k, v in _servers.NETRA_DEFAULTS.items()} | {
                k: v for k, v in os.environ.items() if k.startswith("NETRA_") and k != "NETRA_JWT_SECRET"},
        },
        "summary": summary,
        "ratios": ratios(summary, args),
        "problems": _problems(rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench workers", description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, alternated (default: 1,2)")
    p.add_argument("--connections", default="100,1000", help="comma-separated connection counts (default: 100,1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians of the rounds (default: 3)")
    p.add_argument("--duration", type=float, default=5.0, help="timed seconds per measurement (default: 5)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before the timed window; these runs are checked in full (default: 2)")
    p.add_argument("--client-processes", type=int, default=1, help="client processes (default: 1)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of netra and the client (and their autogroups), e.g. -10 on a shared machine "
                        "(needs CAP_SYS_NICE; default 0)")
    p.add_argument("--run-timeout", type=float, default=30.0, help="longest wait for runs in flight at the end")
    p.add_argument("--netra-root", type=Path, default=None,
                   help="run the netra package of this source tree instead of this repository's")
    p.add_argument("--netra-label", help="what the measured netra is; recorded in the JSON and the report")
    p.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        args.workers = [int(x) for x in args.workers.split(",") if x]
        args.connections = [int(x) for x in args.connections.split(",") if x]
    except ValueError:
        p.error("--workers and --connections are comma-separated numbers")
    if (args.rounds < 1 or args.duration <= 0 or args.warmup <= 0 or not args.connections or not args.workers
            or min(args.workers) < 1 or min(args.connections) < 1 or args.client_processes < 1):
        p.error("--rounds, --workers, --connections, --client-processes >= 1, --duration and --warmup > 0, please")
    if args.netra_root is not None:
        args.netra_root = args.netra_root.resolve()
        if not (args.netra_root / "netra" / "__init__.py").exists():
            p.error("--netra-root must hold a netra/ package")
    args.cpus = set(os.sched_getaffinity(0))
    out = run(args)
    report(out)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 1 if any("error" in r for r in out["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
