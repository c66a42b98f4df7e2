"""``python -m bench hotpath``: the golden path's cost, with a client that is not the ceiling.

The servers (netra without a store, netra with its default SQLite store in a
fresh data folder, the FastAPI + uvicorn peer) run pinned to one core; the
load client (bench/_rawclient.py: raw sockets, epoll, hand-written framing)
runs in its own processes pinned to the other core(s). For each round, each
server in turn (the order rotates every round) is started, and for each
connection count every connection sends a user_message
``what is [[tool:calculator {"expression": "U*K"}]]`` and the next one the
moment the run's ``agent_completed`` arrives (10 events per run), for
``--warmup`` seconds (runs checked in full, not timed) and then
``--duration`` seconds (timed). The server's and the client's CPU are read
from ``/proc`` at the window's edges, so CPU per run is the server's own, and
the client's busy fraction shows whether it could have gone faster.

A report goes to stderr, the JSON to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("netra", "netra-sqlite", "peer")
HZ = os.sysconf("SC_CLK_TCK")
EVENTS_PER_RUN = 10  # agent_started, thinking, tool_executing, tool_completed, thinking, 4 deltas, completed


def _log(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc readers


def proc_cpu(pid: int, tree: bool = True) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` (and its live descendants)."""
    user = system = 0
    for p in _servers._descendants(pid) if tree else [pid]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / HZ, system / HZ


CPU_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_lines() -> dict[int, list[int]]:
    """Per CPU: the ticks of /proc/stat's first 8 columns since boot."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *rest = line.split()
            out[int(name[3:])] = [int(x) for x in rest[:8]]
    return out


def core_busy(a: dict[int, list[int]], b: dict[int, list[int]], cpus: set[int]) -> dict[str, float] | None:
    """Busy fraction of ``cpus`` between two readings, and its parts: busy
    counts irq and softirq work (loopback TCP), which no process is charged
    for, and steal (time the hypervisor gave to someone else)."""
    cols = [sum(b[c][i] - a[c][i] for c in cpus if c in a and c in b) for i in range(8)]
    total = sum(cols)
    if not total:
        return None
    out = {name: round(cols[i] / total, 3) for i, name in enumerate(CPU_COLUMNS) if name not in ("idle", "iowait")}
    out["busy"] = round((total - cols[3] - cols[4]) / total, 3)
    return out


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "kernel": platform.release()}


def netra_source(root: Path) -> dict[str, Any]:
    """Which netra was measured: the commit of its tree and its uncommitted files."""
    out: dict[str, Any] = {"tree": "this repository" if root == ROOT else "--netra-root"}
    try:
        out["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                       capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "netra"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        out["uncommitted_netra_files"] = [line[3:] for line in status]
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


# --------------------------------------------------------------------------
# client workers


class Worker:
    """One client process (bench/_rawclient.py) and a bounded line reader on its stdout."""

    def __init__(self, spec: dict[str, Any], cpus: set[int], secret: str, nice: int = 0) -> None:
        env = {**os.environ, "NETRA_JWT_SECRET": secret,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

        def pin() -> None:
            _servers.pdeathsig()
            os.sched_setaffinity(0, cpus)
            if nice:
                _servers.set_priority(nice)  # its own session (below), so its own autogroup

        self.proc = subprocess.Popen([sys.executable, "-m", "bench._rawclient", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env,
                                     preexec_fn=pin, start_new_session=bool(nice))
        self.buf = b""

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, tag: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"client worker: no {tag} within {timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"client worker exited ({self.proc.wait()}) before {tag}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        got, _, body = line.decode().partition(" ")
        if got != tag:
            raise RuntimeError(f"client worker said {got!r} instead of {tag}")
        return json.loads(body)

    def reap(self, grace_s: float = 10.0) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of seconds, in ms."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 2)


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _settle(pid: int, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until the server uses under 5% of a core: the last
    measurement's connections closed and its runs ended."""
    deadline = time.monotonic() + timeout_s
    last = sum(proc_cpu(pid))
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(proc_cpu(pid))
        if now - last < 0.0125:
            return
        last = now


def measure(server: _servers.Server, connections: int, args: argparse.Namespace, secret: str,
            round_no: int) -> dict[str, Any]:
    pid = server.proc.pid
    procs = max(1, min(args.client_processes, connections))
    workers: list[Worker] = []
    first = 1
    prefix = f"hot-{server.kind}-r{round_no}-c{connections}-{os.getpid()}"
    try:
        for count in _split(connections, procs):
            spec = {"mode": "load", "io": args.client_io, "host": _servers.HOST, "port": server.port,
                    "prefix": prefix, "first_user": first, "users": count,
                    "connect_concurrency": max(1, 200 // procs), "connect_phase_s": 60.0,
                    "go_timeout_s": 120.0, "drain_timeout_s": args.run_timeout, "close_timeout_s": 5.0}
            first += count
            workers.append(Worker(spec, args.client_cpus, secret, args.nice))
        ready = [w.expect("READY", 90.0) for w in workers]
        opened = sum(r["open"] for r in ready)
        t_go = time.monotonic() + 0.2
        t_warm = t_go + args.warmup
        t_stop = t_warm + args.duration
        for w in workers:
            w.send(f"GO {t_go!r} {t_warm!r} {t_stop!r}")
        _sleep_until(t_warm)
        a_wall, a_srv, a_cpus = time.monotonic(), proc_cpu(pid), cpu_lines()
        a_cli = [proc_cpu(w.proc.pid, tree=False) for w in workers]
        _sleep_until(t_stop)
        b_wall, b_srv, b_cpus = time.monotonic(), proc_cpu(pid), cpu_lines()
        b_cli = [proc_cpu(w.proc.pid, tree=False) for w in workers]
        results = [w.expect("RESULT", args.run_timeout + 30.0) for w in workers]
    finally:
        for w in workers:
            w.reap()
    wall = max(b_wall - a_wall, 1e-9)
    lat = [x for r in results for x in r["lat"]]
    runs = sum(r["runs"] for r in results)                  # runs completed in the window
    events = sum(r["events"] for r in results)              # the frames of those runs
    frames = sum(r["window_frames"] for r in results)       # every frame received in the window
    per_run = events / runs if runs else None
    # Throughput from the frames received in the window, not from the runs completed
    # in it: with 1000 connections a run can take seconds, runs then complete in waves,
    # and a count of completed runs is quantized to whole waves (1000 runs at a time).
    work = frames / per_run if per_run else 0.0
    srv_user, srv_sys = b_srv[0] - a_srv[0], b_srv[1] - a_srv[1]
    srv_cpu = srv_user + srv_sys
    cli = [{"user_s": round(b[0] - a[0], 3), "sys_s": round(b[1] - a[1], 3)} for a, b in zip(a_cli, b_cli)]
    cli_cpu = sum(c["user_s"] + c["sys_s"] for c in cli)

    def add(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in results:
            for k, v in r.get(key, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    frames_per_run = add("frames_per_run")
    srv_core = core_busy(a_cpus, b_cpus, args.server_cpus)
    cli_core = core_busy(a_cpus, b_cpus, args.client_cpus)

    def others(core: dict[str, float] | None, ours: float) -> float | None:
        """Share of the core used by neither our process(es) nor interrupts:
        other processes on the machine, and steal."""
        if core is None:
            return None
        return round(max(0.0, core["busy"] - core["irq"] - core["softirq"] - ours), 3)

    return {
        "server": server.kind, "connections": connections, "round": round_no, "opened": opened,
        "connect_s": max(r["connect_s"] for r in ready),
        "window_s": round(wall, 3), "runs_completed_in_window": runs, "events_received_in_window": frames,
        "runs_per_s": round(work / wall, 1), "events_per_s": round(frames / wall, 1),
        "completed_runs_per_s": round(runs / wall, 1),
        "events_per_run": round(per_run, 2) if per_run else None,
        "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": _pct(lat, 100)},
        "server_cpu": {"user_s": round(srv_user, 3), "sys_s": round(srv_sys, 3)},
        "server_busy": round(srv_cpu / wall, 3),
        "server_us_per_run": round(srv_cpu / work * 1e6, 1) if work else None,
        "server_us_per_event": round(srv_cpu / frames * 1e6, 2) if frames else None,
        "client_cpu": cli,
        "client_busy": round(cli_cpu / wall / len(args.client_cpus), 3),
        "client_us_per_run": round(cli_cpu / work * 1e6, 1) if work else None,
        "server_core": srv_core,
        "client_core": cli_core,
        "server_own": None if srv_core is None else round(srv_cpu / wall + srv_core["irq"] + srv_core["softirq"], 3),
        "server_core_others": others(srv_core, srv_cpu / wall),
        "client_core_others": others(cli_core, cli_cpu / wall / len(args.client_cpus)),
        "checks": {
            "runs_sent": sum(r["runs_sent"] for r in results),
            "runs_completed": sum(r["runs_completed_all"] for r in results),
            "warmup_runs_checked_ok": sum(r["verified_ok"] for r in results),
            "warmup_check_failures": add("verify_failed"),
            "seq_errors": sum(r["seq_errors"] for r in results),
            "failed_runs": add("failed"),
            "unfinished_at_drain": sum(r["unfinished_at_drain"] for r in results),
            "frames_per_timed_run": frames_per_run,
            "errors": add("errors"), "close_codes": add("close_codes"),
            "connect_errors": {k: v for r in ready for k, v in r["errors"].items()},
        },
    }


# --------------------------------------------------------------------------
# the bench


def _start(kind: str, args: argparse.Namespace, secret: str, log_dir: Path, round_no: int) -> _servers.Server:
    forced = {"NETRA_MAX_CONNECTIONS": str(max(10000, max(args.connections) + 100))}
    unset: tuple[str, ...] = ()
    if kind == "netra":
        forced["NETRA_DATABASE_URL"] = "none"
    elif kind == "netra-sqlite":
        data = log_dir / f"sqlite-r{round_no}"
        data.mkdir(parents=True, exist_ok=True)
        forced["NETRA_DATA_DIR"] = str(data)
        unset = ("NETRA_DATABASE_URL",)
    server = _servers.start(kind, secret=secret, delay_ms=0.0, log_dir=log_dir, netra_forced=forced,
                            netra_unset=unset, netra_root=args.netra_root, cpus=args.server_cpus,
                            nofile=max(args.connections) * 2 + 1000, nice=args.nice)
    trio.run(_servers.wait_ready, server)
    pinned = _servers.affinity_of(server.proc.pid)
    if any(set(c) != args.server_cpus for c in pinned.values()):
        raise RuntimeError(f"{kind}: not every thread is pinned to {sorted(args.server_cpus)}: {pinned}")
    return server


def _median(rows: list[dict[str, Any]], key: str, sub: str | None = None) -> float | None:
    vals = [(r[key] or {}).get(sub) if sub else r[key] for r in rows]
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarize(rows: list[dict[str, Any]], kinds: list[str], counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        for n in counts:
            mine = [r for r in rows if r["server"] == kind and r["connections"] == n and "error" not in r]
            if not mine:
                continue
            out[f"{kind}@{n}"] = {
                "server": kind, "connections": n, "rounds": len(mine),
                "runs_per_s": _median(mine, "runs_per_s"),
                "p50_ms": _median(mine, "latency_ms", "p50"), "p99_ms": _median(mine, "latency_ms", "p99"),
                "server_us_per_run": _median(mine, "server_us_per_run"),
                "server_us_per_event": _median(mine, "server_us_per_event"),
                "events_per_run": _median(mine, "events_per_run"),
                "server_busy": _median(mine, "server_busy"),
                "server_core_busy": _median(mine, "server_core", "busy"),
                "server_core_softirq": _median(mine, "server_core", "softirq"),
                "server_own": _median(mine, "server_own"),
                "server_core_others": _median(mine, "server_core_others"),
                "client_core_busy": _median(mine, "client_core", "busy"),
                "client_core_others": _median(mine, "client_core_others"),
                "client_busy": _median(mine, "client_busy"),
                "client_us_per_run": _median(mine, "client_us_per_run"),
                "runs_per_s_each_round": [r["runs_per_s"] for r in mine],
            }
    return out


def ratios(summary: dict[str, Any], kinds: list[str], counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        if kind == "peer":
            continue
        for n in counts:
            mine, peer = summary.get(f"{kind}@{n}"), summary.get(f"peer@{n}")
            if not mine or not peer:
                continue

            def r(key: str) -> float | None:
                a, b = mine[key], peer[key]
                return round(a / b, 3) if a is not None and b else None

            out[f"{kind}/peer@{n}"] = {"runs_per_s": r("runs_per_s"), "p50_ms": r("p50_ms"), "p99_ms": r("p99_ms"),
                                       "server_us_per_run": r("server_us_per_run")}
    return out


def ceiling_check(summary: dict[str, Any], counts: list[int], limit: float) -> dict[str, Any]:
    """Can the client drive the peer at the peer's ceiling? Yes when, during the
    peer's rounds, the peer's core was saturated by the peer itself (its
    process plus the loopback TCP work of its core's softirqs, not other
    processes) and the client's processes did not saturate theirs."""
    out: dict[str, Any] = {}
    for n in counts:
        peer = summary.get(f"peer@{n}")
        if not peer:
            continue
        core, own, cli = peer["server_core_busy"], peer["server_own"], peer["client_busy"]
        if cli is not None and cli >= limit:
            verdict = "client may be the bottleneck (its core is saturated): add client cores or processes"
        elif core is not None and own is not None and core >= 0.95 and own >= 0.9:
            verdict = "client is not the bottleneck"
        elif core is not None and core >= 0.95:
            verdict = "peer's core saturated, but by other processes too: rerun on a quiet machine"
        else:
            verdict = "neither the peer's core nor the client's is saturated: latency-bound, not at a ceiling"
        out[str(n)] = {"peer_server_core_busy": core, "peer_process_busy": peer["server_busy"],
                       "peer_core_softirq": peer["server_core_softirq"], "peer_server_own": own,
                       "client_busy": cli, "client_limit": limit, "verdict": verdict,
                       "ok": verdict == "client is not the bottleneck"}
    return out


def report(out: dict[str, Any]) -> None:
    m = out["meta"]["machine"]
    _log()
    _log(f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
         f"Linux {m['kernel']}")
    src = out["meta"]["netra_source"]
    what = [src["label"]] if src.get("label") else []
    if src.get("commit"):
        what.append(f"commit {src['commit']}, {len(src.get('uncommitted_netra_files') or [])} uncommitted "
                    f"files under netra/")
    _log(f"netra: {'; '.join(what) or 'commit unknown'} ({src['tree']})")
    meta = out["meta"]
    _log(f"busy per core before the bench: {meta['busy_per_core_before']}")
    _log(f"server cpus {meta['server_cpus']}, client cpus {meta['client_cpus']} ({meta['client_processes']} client "
         f"process(es), {meta['client_io']}, nice {meta['nice']}); {meta['rounds']} rounds x {meta['duration_s']} s timed "
         f"(+{meta['warmup_s']} s warm-up); medians of the rounds")
    _log()
    cols = [("server", 13, "server"), ("conns", 6, "connections"), ("runs/s", 9, "runs_per_s"),
            ("p50 ms", 9, "p50_ms"), ("p99 ms", 9, "p99_ms"), ("srv us/run", 11, "server_us_per_run"),
            ("srv us/ev", 10, "server_us_per_event"), ("ev/run", 7, "events_per_run"),
            ("srv proc", 9, "server_busy"), ("srv core", 9, "server_core_busy"), ("others", 7, "server_core_others"),
            ("cli busy", 9, "client_busy"), ("others", 7, "client_core_others"), ("cli us/run", 11, "client_us_per_run")]
    _log("".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w, _) in enumerate(cols)))
    for row in out["summary"].values():
        _log("".join(f"{str(row[k]):<{w}}" if i == 0 else f"{str(row[k]):>{w}}" for i, (_, w, k) in enumerate(cols)))
    _log()
    for key, r in out["ratios"].items():
        _log(f"ratio {key:<22} runs/s {r['runs_per_s']}  p50 {r['p50_ms']}  p99 {r['p99_ms']}  "
             f"server us/run {r['server_us_per_run']}")
    for n, c in out["ceiling_check"].items():
        _log(f"client ceiling check @{n} connections: peer server core busy {c['peer_server_core_busy']} "
             f"(peer process {c['peer_process_busy']} + its softirq {c['peer_core_softirq']}), "
             f"client busy {c['client_busy']} -> {c['verdict']}")
    if out["problems"]:
        _log()
        for p in out["problems"]:
            _log(f"PROBLEM: {p}")


def load_problems(tag: str, r: dict[str, Any]) -> list[str]:
    """What one measurement's own checks found: connections not opened,
    seq errors, failed or unchecked runs (shared with bench.workers)."""
    c = r["checks"]
    out = []
    if r["opened"] != r["connections"]:
        out.append(f"{tag}: {r['opened']}/{r['connections']} connections opened {c['connect_errors']}")
    for key in ("seq_errors", "unfinished_at_drain", "warmup_check_failures", "failed_runs", "errors"):
        if c[key]:
            out.append(f"{tag}: {key} {c[key]}")
    if not c["warmup_runs_checked_ok"]:
        out.append(f"{tag}: no warm-up run was checked")
    return out


def _problems(rows: list[dict[str, Any]], limit: float) -> list[str]:
    out = []
    for r in rows:
        tag = f"{r['server']}@{r['connections']} round {r['round']}"
        if "error" in r:
            out.append(f"{tag}: {r['error']}")
            continue
        out.extend(load_problems(tag, r))
        for side in ("server", "client"):
            if (r[f"{side}_core_others"] or 0) > 0.05:
                out.append(f"{tag}: other processes (or steal) used {r[f'{side}_core_others']} of the {side}'s "
                           f"core: that round is noisy")
        if r["client_busy"] >= limit:
            out.append(f"{tag}: client busy {r['client_busy']} >= {limit}: the client may be the limit")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-hotpath-"))
    _log(f"server logs: {log_dir}")
    os.sched_setaffinity(0, args.client_cpus)  # this process too stays off the server's core

    a = cpu_lines()
    time.sleep(1.0)
    b = cpu_lines()
    quiet = {str(c): (core_busy(a, b, {c}) or {}).get("busy") for c in sorted(a)}
    _log(f"machine busy per core before the bench (1 s, nothing of ours running): {quiet}")
    rows: list[dict[str, Any]] = []
    started = time.time()
    try:
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(args.servers)
            order = args.servers[k:] + args.servers[:k]
            for kind in order:
                try:
                    server = _start(kind, args, secret, log_dir, rnd)
                except Exception as exc:  # noqa: BLE001 - the other servers' figures are still worth having
                    for n in args.connections:
                        rows.append({"server": kind, "connections": n, "round": rnd, "error": str(exc)[:500]})
                    _log(f"round {rnd} {kind}: could not start: {exc}")
                    continue
                try:
                    for n in args.connections:
                        try:
                            row = measure(server, n, args, secret, rnd)
                        except Exception as exc:  # noqa: BLE001
                            row = {"server": kind, "connections": n, "round": rnd,
                                   "error": f"{type(exc).__name__}: {exc}"[:500]}
                        rows.append(row)
                        if "error" in row:
                            _log(f"round {rnd} {kind:<12} {n:>5} conns: ERROR {row['error']}")
                        else:
                            _log(f"round {rnd} {kind:<12} {n:>5} conns: {row['runs_per_s']:>8} runs/s  "
                                 f"p50 {row['latency_ms']['p50']} p99 {row['latency_ms']['p99']} ms  "
                                 f"server {row['server_us_per_run']} us/run busy {row['server_busy']} "
                                 f"(core {(row['server_core'] or {}).get('busy')})  client busy {row['client_busy']} "
                                 f"(" + ", ".join(f"user {c['user_s']} s + sys {c['sys_s']} s"
                                                  for c in row["client_cpu"]) + f" of {row['window_s']} s)")
                        _settle(server.proc.pid)
                finally:
                    _servers.stop(server)
                    shutil.rmtree(log_dir / f"sqlite-r{rnd}", ignore_errors=True)  # netra-sqlite's data folder
    finally:
        for data in log_dir.glob("sqlite-r*"):
            shutil.rmtree(data, ignore_errors=True)
    summary = summarize(rows, args.servers, args.connections)
    out = {
        "meta": {
            "benchmark": "hotpath",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s_total": round(time.time() - started, 1),
            "machine": machine(),
            "busy_per_core_before": quiet,
            "netra_source": netra_source(args.netra_root or ROOT) | ({"label": args.netra_label}
                                                                      if args.netra_label else {}),
            "servers": args.servers, "connections": args.connections, "rounds": args.rounds,
            "duration_s": args.duration, "warmup_s": args.warmup,
            "server_cpus": sorted(args.server_cpus), "client_cpus": sorted(args.client_cpus),
            "client_processes": args.client_processes, "client_io": args.client_io, "nice": args.nice,
            "events_per_run_expected": EVENTS_PER_RUN,
            "netra_env": {k: v for k, v in _servers.NETRA_DEFAULTS.items()} | {
                k: v for k, v in os.environ.items() if k.startswith("NETRA_") and k != "NETRA_JWT_SECRET"},
        },
        "summary": summary,
        "ratios": ratios(summary, args.servers, args.connections),
        "ceiling_check": ceiling_check(summary, args.connections, args.client_limit),
        "problems": _problems(rows, args.client_limit),
        "rows": rows,
    }
    return out


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench hotpath", description=__doc__.splitlines()[0])
    p.add_argument("--servers", default=",".join(KINDS),
                   help=f"comma-separated, alternated in this order, rotated each round (default: {','.join(KINDS)})")
    p.add_argument("--connections", default="100,1000", help="comma-separated connection counts (default: 100,1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians of the rounds (default: 3)")
    p.add_argument("--duration", type=float, default=5.0, help="timed seconds per measurement (default: 5)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before the timed window; these runs are checked in full (default: 2)")
    p.add_argument("--server-cpus", type=_cpus, default=None, help="CPUs of the server (default: 0)")
    p.add_argument("--client-cpus", type=_cpus, default=None, help="CPUs of the client (default: all others)")
    p.add_argument("--client-processes", type=int, default=1, help="client processes (default: 1)")
    p.add_argument("--client-io", choices=("epoll", "uvloop"), default="epoll",
                   help="the client's I/O loop (default: epoll; uvloop measured as lean, and needs a package)")
    p.add_argument("--client-limit", type=float, default=0.85,
                   help="client busy fraction from which the client may be the bottleneck (default: 0.85)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the servers and clients (and of their autogroups), e.g. -10 on a machine "
                        "shared with other work: they then keep most of their cores when others want them "
                        "(needs CAP_SYS_NICE; default 0)")
    p.add_argument("--run-timeout", type=float, default=30.0, help="longest wait for runs in flight at the end")
    p.add_argument("--netra-root", type=Path, default=None,
                   help="run the netra package of this source tree instead of this repository's")
    p.add_argument("--netra-label", help="what the measured netra is (e.g. the commit of an exported tree); "
                   "recorded in the JSON and the report")
    p.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    for s in args.servers:
        if s not in KINDS:
            p.error(f"unknown server {s!r} (use {', '.join(KINDS)})")
    args.connections = [int(x) for x in args.connections.split(",") if x]
    if args.rounds < 1 or args.duration <= 0 or args.warmup <= 0 or not args.connections:
        p.error("--rounds >= 1, --duration > 0, --warmup > 0 and at least one connection count, please")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 and (args.server_cpus is None or args.client_cpus is None):
        p.error("needs 2 CPUs (one for the server, one for the client)")
    args.server_cpus = args.server_cpus or {cpus[0]}
    args.client_cpus = args.client_cpus or (set(cpus) - args.server_cpus)
    if args.server_cpus & args.client_cpus:
        p.error("--server-cpus and --client-cpus must not overlap")
    if args.netra_root is not None:
        args.netra_root = args.netra_root.resolve()
        if not (args.netra_root / "netra" / "__init__.py").exists():
            p.error("--netra-root must hold a netra/ package")
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
