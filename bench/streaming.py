"""``python -m bench.streaming``: delta latency of long streamed answers at increasing concurrency.

Every run's scripted model streams its answer in ``--chunks`` text_delta
events (``[[stream:N]]``, honoured by netra and by the reference servers'
shared script alike), waiting ``--delay-ms`` before each: 50 chunks 20 ms
apart by default, i.e. 50 deltas per second per run. At each concurrency
level C, C connections (one user each) run ``--runs-per-user`` such runs one
after the other, their first start spread evenly at random over one run's
length, so that about C runs stream at once.

As in ``python -m bench hotpath``, the server runs pinned to one core and the
client, the raw-socket client of bench/_rawclient.py (``stream`` mode: epoll,
hand-written framing, every frame decoded and checked), in its own
process(es) pinned to the other core(s); each measurement starts a fresh
server; the servers alternate within each level (the order rotates every
round), one alive at a time. The server's and the client's CPU and their
cores' busy fractions are read from /proc at the window's edges, so a level
where the client was the limit, or where other work shared a core, shows.

For each text_delta the client records, at arrival:

- ``delta_ms`` = arrival wall clock - the event's ``ts`` (epoch ms; the same
  clock: everything is on this machine). netra stamps ``ts`` when it encodes
  the frames of a scheduler pass for the socket, the peer just before its
  ``send_text``: the server-write-to-client-read path (socket, client
  queueing), not the server's own scheduling slip;
- ``lateness_ms`` = arrival - when the frame's last chunk was due: the
  ``ts`` of the run's last ``agent_thinking`` + k x delay for chunk k (which
  chunk a frame ends with is known from the characters received, so a merged
  frame counts as its last chunk). It includes the server's own slip, and
  accumulates over a run (each chunk waits ``delay`` after the previous one
  was produced);
- ``gap_ms`` = arrival of a delta frame - arrival of the previous one of
  the same run, to compare with the set rate (``delay_ms``).

Per server and level, the figures are the medians over ``--rounds`` rounds.
The summary gives, per server, the largest level whose median delta p99 (and
all lower levels') stays under ``--slo-ms`` (100 ms) with no failed run, the
same for lateness p99, the largest level whose mean gap stays within
``--rate-slack`` (10%) of the set rate (the server still streams 50 deltas/s
per run), and netra/peer of each. Because ``ts`` is stamped at the write,
delta p99 stays small until the socket path itself backs up; a server whose
event loop falls behind shows it first in lateness and gap (each chunk of the
scripted model waits ``delay`` after the previous one was produced, so a busy
server streams slower rather than later). A server stops climbing after a
level whose median lateness p99 exceeds ``--stop-ms``, or after two levels in
a row whose median delta p99 is over ``--slo-ms``; a headline figure equal to
the last level run is a lower bound (marked ``+`` in the report).

A report goes to stderr, the JSON to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers
from .hotpath import (
    Worker,
    _cpus,
    _split,
    core_busy,
    cpu_lines,
    machine,
    netra_source,
    proc_cpu,
)
from .load import percentile

KINDS = ("netra", "peer", "floor")
LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2000)


def _log(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _start(kind: str, args: argparse.Namespace, secret: str, log_dir: Path) -> _servers.Server:
    top = max(args.levels)
    big = str(max(100000, top * 4))
    forced = {"NETRA_MAX_CONNECTIONS": str(top + 100), "NETRA_MAX_RUNS": big, "NETRA_MAX_MODEL_CALLS": big,
              "NETRA_MAX_QUEUED_RUNS": big, "NETRA_DATABASE_URL": "none"}
    server = _servers.start(kind, secret=secret, delay_ms=args.delay_ms, log_dir=log_dir, netra_forced=forced,
                            netra_root=args.netra_root, cpus=args.server_cpus, nofile=top * 2 + 1000,
                            nice=args.nice)
    try:
        trio.run(_servers.wait_ready, server)
        pinned = _servers.affinity_of(server.proc.pid)
        if any(set(c) != args.server_cpus for c in pinned.values()):
            raise RuntimeError(f"{kind}: not every thread is pinned to {sorted(args.server_cpus)}: {pinned}")
    except BaseException:
        _servers.stop(server)
        raise
    return server


def measure(server: _servers.Server, conc: int, args: argparse.Namespace, secret: str,
            round_no: int) -> dict[str, Any]:
    pid = server.proc.pid
    run_s = args.chunks * args.delay_ms / 1000
    deadline_s = 60 + run_s * (args.runs_per_user + 1) * 20
    question = ("streaming benchmark question " * 40)[: max(120, min(480, 3 * args.chunks))]
    procs = max(1, min(args.client_processes, conc))
    workers: list[Worker] = []
    first = 1
    prefix = f"stream-{server.kind}-r{round_no}-c{conc}-{os.getpid()}"
    try:
        for count in _split(conc, procs):
            spec = {"mode": "stream", "host": _servers.HOST, "port": server.port, "prefix": prefix,
                    "first_user": first, "users": count, "text": f"{question} [[stream:{args.chunks}]]",
                    "chunks": args.chunks, "delay_ms": args.delay_ms, "runs_per_user": args.runs_per_user,
                    "spread_s": run_s, "run_timeout_s": max(30.0, run_s * 20), "deadline_s": deadline_s,
                    "connect_concurrency": max(1, 200 // procs), "connect_phase_s": 60.0 + conc / 20,
                    "go_timeout_s": 120.0, "close_timeout_s": 5.0}
            first += count
            workers.append(Worker(spec, args.client_cpus, secret, args.nice))
        ready = [w.expect("READY", 90.0 + conc / 20) for w in workers]
        t_go = time.monotonic() + 0.2
        a_wall, a_srv, a_cpus = time.monotonic(), proc_cpu(pid), cpu_lines()
        a_cli = [proc_cpu(w.proc.pid, tree=False) for w in workers]
        for w in workers:
            w.send(f"GO {t_go!r}")
        results = [w.expect("RESULT", deadline_s + 30) for w in workers]
        b_wall, b_srv, b_cpus = time.monotonic(), proc_cpu(pid), cpu_lines()
        b_cli = [proc_cpu(w.proc.pid, tree=False) for w in workers]
    finally:
        for w in workers:
            w.reap()
    wall = max(b_wall - a_wall, 1e-9)
    delta = [x for r in results for x in r["delta_ms"]]
    late = [x for r in results for x in r["late_ms"]]
    gaps = [x for r in results for x in r["gap_ms"]]
    srv_user, srv_sys = b_srv[0] - a_srv[0], b_srv[1] - a_srv[1]
    srv_cpu = srv_user + srv_sys
    cli = [{"user_s": round(b[0] - a[0], 3), "sys_s": round(b[1] - a[1], 3)} for a, b in zip(a_cli, b_cli)]
    cli_cpu = sum(c["user_s"] + c["sys_s"] for c in cli)
    srv_core = core_busy(a_cpus, b_cpus, args.server_cpus)
    cli_core = core_busy(a_cpus, b_cpus, args.client_cpus)

    def others(core: dict[str, float] | None, ours: float) -> float | None:
        if core is None:
            return None
        return round(max(0.0, core["busy"] - core["irq"] - core["softirq"] - ours), 3)

    def add(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in results:
            for k, v in r.get(key, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    runs_ok = sum(r["runs_ok"] for r in results)
    chunks_ok = runs_ok * args.chunks
    failed = add("failed")
    return {
        "server": server.kind, "concurrency": conc, "round": round_no,
        "connected": sum(r["open"] for r in ready), "connect_errors": {k: v for r in ready for k, v in r["errors"].items()},
        "runs_expected": conc * args.runs_per_user, "runs_ok": runs_ok,
        "runs_failed": sum(failed.values()) + sum(r["unfinished"] + r["dropped"] for r in results),
        "failed": failed, "unfinished": sum(r["unfinished"] for r in results),
        "dropped": sum(r["dropped"] for r in results), "seq_errors": sum(r["seq_errors"] for r in results),
        "verify_failed": add("verify_failed"), "errors": add("errors"), "close_codes": add("close_codes"),
        "delta_frames": len(delta), "merged_runs": sum(r["merged_runs"] for r in results),
        "frames_saved_by_merging": sum(r["frames_saved_by_merging"] for r in results),
        "delta_ms": {"p50": percentile(delta, 50), "p99": percentile(delta, 99), "max": percentile(delta, 100)},
        "lateness_ms": {"p50": percentile(late, 50), "p99": percentile(late, 99), "max": percentile(late, 100)},
        "gap_ms": {"set": args.delay_ms, "mean": round(sum(gaps) / len(gaps), 2) if gaps else None,
                   "p50": percentile(gaps, 50), "p99": percentile(gaps, 99)},
        "window_s": round(wall, 3), "deltas_per_s": round(len(delta) / wall, 1),
        "server_cpu": {"user_s": round(srv_user, 3), "sys_s": round(srv_sys, 3)},
        "server_busy": round(srv_cpu / wall, 3),
        "server_us_per_chunk": round(srv_cpu / chunks_ok * 1e6, 1) if chunks_ok else None,
        "server_core": srv_core, "server_core_others": others(srv_core, srv_cpu / wall),
        "client_cpu": cli,
        "client_busy": round(cli_cpu / wall / len(args.client_cpus), 3),
        "client_us_per_frame": round(cli_cpu / max(1, sum(r["frames"] for r in results)) * 1e6, 1),
        "client_core": cli_core,
        "client_core_others": others(cli_core, cli_cpu / wall / len(args.client_cpus)),
    }


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def summarize_level(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One server at one level: medians over the rounds."""
    return {
        "server": rows[0]["server"], "concurrency": rows[0]["concurrency"], "rounds": len(rows),
        "delta_p50_ms": _median([r["delta_ms"]["p50"] for r in rows]),
        "delta_p99_ms": _median([r["delta_ms"]["p99"] for r in rows]),
        "delta_p99_ms_each_round": [r["delta_ms"]["p99"] for r in rows],
        "lateness_p99_ms": _median([r["lateness_ms"]["p99"] for r in rows]),
        "gap_mean_ms": _median([r["gap_ms"]["mean"] for r in rows]),
        "gap_mean_over_set": None,
        "gap_p99_ms": _median([r["gap_ms"]["p99"] for r in rows]),
        "runs_ok": sum(r["runs_ok"] for r in rows), "runs_expected": sum(r["runs_expected"] for r in rows),
        "failures": sum(r["runs_failed"] + (r["concurrency"] - r["connected"]) for r in rows),
        "merged_runs": sum(r["merged_runs"] for r in rows),
        "deltas_per_s": _median([r["deltas_per_s"] for r in rows]),
        "server_busy": _median([r["server_busy"] for r in rows]),
        "server_core_busy": _median([(r["server_core"] or {}).get("busy") for r in rows]),
        "server_core_others": _median([r["server_core_others"] for r in rows]),
        "server_us_per_chunk": _median([r["server_us_per_chunk"] for r in rows]),
        "client_busy": _median([r["client_busy"] for r in rows]),
        "client_busy_max": max(r["client_busy"] for r in rows),
        "client_core_others": _median([r["client_core_others"] for r in rows]),
    }


def _largest_under(levels: list[dict[str, Any]], key: str, slo: float) -> tuple[int, bool]:
    """(largest level whose ``key``, and every lower level's, is under
    ``slo`` with no failure; whether the last level run still was: then the
    figure is only a lower bound)."""
    best, ordered = 0, sorted(levels, key=lambda r: r["concurrency"])
    for row in ordered:
        if row[key] is None or row[key] >= slo or row["failures"]:
            return best, False
        best = row["concurrency"]
    return best, bool(ordered)


def _problems(rows: list[dict[str, Any]], limit: float) -> list[str]:
    out = []
    for r in rows:
        tag = f"{r['server']}@{r['concurrency']} round {r['round']}"
        if "error" in r:
            out.append(f"{tag}: {r['error']}")
            continue
        if r["connected"] != r["concurrency"]:
            out.append(f"{tag}: {r['connected']}/{r['concurrency']} connections opened {r['connect_errors']}")
        for key in ("failed", "verify_failed"):
            if r[key]:
                out.append(f"{tag}: {key} {r[key]}")
        for key in ("unfinished", "dropped", "seq_errors"):
            if r[key]:
                out.append(f"{tag}: {key} {r[key]}")
        for side in ("server", "client"):
            if (r[f"{side}_core_others"] or 0) > 0.05:
                out.append(f"{tag}: other processes (or steal) used {r[f'{side}_core_others']} of the {side}'s "
                           f"core: that round is noisy")
        if r["client_busy"] >= limit:
            out.append(f"{tag}: client busy {r['client_busy']} >= {limit}: the client may be the limit")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-streaming-"))
    _log(f"server logs: {log_dir}")
    os.sched_setaffinity(0, args.client_cpus)
    a = cpu_lines()
    time.sleep(1.0)
    b = cpu_lines()
    quiet = {str(c): (core_busy(a, b, {c}) or {}).get("busy") for c in sorted(a)}
    _log(f"machine busy per core before the bench (1 s, nothing of ours running): {quiet}")
    started = time.time()
    rows: list[dict[str, Any]] = []
    levels: dict[str, list[dict[str, Any]]] = {k: [] for k in args.servers}
    stopped: dict[str, str] = {}
    over: dict[str, int] = {k: 0 for k in args.servers}
    for li, conc in enumerate(args.levels):
        todo = [k for k in args.servers if k not in stopped]
        if not todo:
            break
        if time.time() - started > args.max_minutes * 60:
            _log(f"time budget of {args.max_minutes} min spent: stopping before level {conc}")
            break
        mine: dict[str, list[dict[str, Any]]] = {k: [] for k in todo}
        for rnd in range(1, args.rounds + 1):
            k = (li + rnd - 1) % len(todo)
            for kind in todo[k:] + todo[:k]:
                try:
                    server = _start(kind, args, secret, log_dir)
                except Exception as exc:  # noqa: BLE001 - the other servers' figures are still worth having
                    row = {"server": kind, "concurrency": conc, "round": rnd, "error": f"could not start: {exc}"[:500]}
                else:
                    try:
                        row = measure(server, conc, args, secret, rnd)
                    except Exception as exc:  # noqa: BLE001
                        row = {"server": kind, "concurrency": conc, "round": rnd,
                               "error": f"{type(exc).__name__}: {exc}"[:500]}
                    finally:
                        _servers.stop(server)
                rows.append(row)
                if "error" in row:
                    _log(f"c={conc:<5} round {rnd} {kind:<6} ERROR {row['error']}")
                    continue
                mine[kind].append(row)
                _log(f"c={conc:<5} round {rnd} {kind:<6} delta p50 {row['delta_ms']['p50']} p99 "
                     f"{row['delta_ms']['p99']} ms  late p99 {row['lateness_ms']['p99']}  gap mean "
                     f"{row['gap_ms']['mean']} p99 {row['gap_ms']['p99']} (set {args.delay_ms})  runs "
                     f"{row['runs_ok']}/{row['runs_expected']} merged {row['merged_runs']}  server "
                     f"{row['server_us_per_chunk']} us/chunk busy {row['server_busy']} (core "
                     f"{(row['server_core'] or {}).get('busy')}, others {row['server_core_others']})  client busy "
                     f"{row['client_busy']} (" + ", ".join(f"user {c['user_s']} s + sys {c['sys_s']} s"
                                                          for c in row["client_cpu"])
                     + f" of {row['window_s']} s, others {row['client_core_others']})")
        for kind in todo:
            if not mine[kind]:
                stopped[kind] = f"no measurement at {conc}"
                continue
            s = summarize_level(mine[kind])
            if s["gap_mean_ms"] is not None:
                s["gap_mean_over_set"] = round(s["gap_mean_ms"] / args.delay_ms, 3)
            levels[kind].append(s)
            p99, late = s["delta_p99_ms"], s["lateness_p99_ms"]
            over[kind] = over[kind] + 1 if (p99 is None or p99 >= args.slo_ms or s["failures"]) else 0
            if late is None or late > args.stop_ms or s["failures"] > s["runs_expected"] // 2:
                stopped[kind] = f"lateness p99 {late} ms > {args.stop_ms:g} ms (or most runs failed) at {conc}"
            elif over[kind] >= 2:
                stopped[kind] = f"delta p99 over {args.slo_ms:g} ms at two levels in a row (up to {conc})"
            if kind in stopped:
                _log(f"{kind}: stops climbing: {stopped[kind]}")
    summary: dict[str, Any] = {}
    for kind, krows in levels.items():
        entry: dict[str, Any] = {}
        for key, field, limit in (("delta_p99_under_slo", "delta_p99_ms", args.slo_ms),
                                  ("lateness_p99_under_slo", "lateness_p99_ms", args.slo_ms),
                                  ("rate_held", "gap_mean_over_set", 1 + args.rate_slack)):
            best, bound = _largest_under(krows, field, limit)
            entry[f"max_concurrency_{key}"] = best
            entry[f"max_concurrency_{key}_is_lower_bound"] = bound
        summary[kind] = entry | {"levels_run": [r["concurrency"] for r in krows],
                                 "failures": sum(r["failures"] for r in krows), "stopped": stopped.get(kind)}
    if "netra" in summary and "peer" in summary:
        for key in ("delta_p99_under_slo", "lateness_p99_under_slo", "rate_held"):
            peer = summary["peer"][f"max_concurrency_{key}"]
            bound = any(summary[k][f"max_concurrency_{key}_is_lower_bound"] for k in ("netra", "peer"))
            # a lower bound (a server never missed the target) makes the ratio meaningless
            summary[f"ratio_netra_peer_{key}"] = (
                round(summary["netra"][f"max_concurrency_{key}"] / peer, 3) if peer and not bound else None)
    return {
        "meta": {
            "benchmark": "streaming",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s_total": round(time.time() - started, 1),
            "machine": machine(), "busy_per_core_before": quiet,
            "netra_source": netra_source(args.netra_root or _servers.ROOT) | (
                {"label": args.netra_label} if args.netra_label else {}),
            "servers": args.servers, "chunks": args.chunks, "delay_ms": args.delay_ms,
            "deltas_per_s_per_run": round(1000 / args.delay_ms, 1) if args.delay_ms else None,
            "runs_per_user": args.runs_per_user, "levels": args.levels, "rounds": args.rounds,
            "slo_ms": args.slo_ms, "stop_ms": args.stop_ms, "rate_slack": args.rate_slack, "server_cpus": sorted(args.server_cpus),
            "client_cpus": sorted(args.client_cpus), "client_processes": args.client_processes,
            "client": "bench/_rawclient.py (stream mode)", "nice": args.nice,
        },
        "summary": summary,
        "levels": levels,
        "problems": _problems(rows, args.client_limit),
        "rows": rows,
    }


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
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
    _log(f"server cpus {meta['server_cpus']}, client cpus {meta['client_cpus']} ({meta['client_processes']} client "
         f"process(es), raw client, nice {meta['nice']}); {meta['chunks']} chunks {meta['delay_ms']:g} ms apart "
         f"({meta['deltas_per_s_per_run']} deltas/s per run), {meta['runs_per_user']} runs per connection; "
         f"medians of {meta['rounds']} rounds")
    _log()
    cols = [("server", 7, "server"), ("conc", 6, "concurrency"), ("delta p50", 10, "delta_p50_ms"),
            ("delta p99", 10, "delta_p99_ms"), ("late p99", 10, "lateness_p99_ms"), ("gap mean", 9, "gap_mean_ms"),
            ("gap p99", 9, "gap_p99_ms"), ("gap/set", 8, "gap_mean_over_set"), ("deltas/s", 10, "deltas_per_s"), ("fail", 5, "failures"),
            ("merged", 7, "merged_runs"), ("srv us/chunk", 13, "server_us_per_chunk"),
            ("srv proc", 9, "server_busy"), ("srv core", 9, "server_core_busy"), ("others", 7, "server_core_others"),
            ("cli busy", 9, "client_busy"), ("others", 7, "client_core_others")]
    _log("".join(f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w, _) in enumerate(cols)))
    by_level = sorted((r for rows in out["levels"].values() for r in rows),
                      key=lambda r: (r["concurrency"], r["server"]))
    for row in by_level:
        _log("".join(f"{str(row[k]):<{w}}" if i == 0 else f"{str(row[k]):>{w}}" for i, (_, w, k) in enumerate(cols)))
    _log()
    s = out["summary"]
    for key, what in (("delta_p99_under_slo", f"delta p99 < {args.slo_ms:g} ms"),
                      ("lateness_p99_under_slo", f"lateness p99 < {args.slo_ms:g} ms"),
                      ("rate_held", f"gap mean <= {1 + args.rate_slack:g} x {args.delay_ms:g} ms")):
        parts = [f"{k} {s[k]['max_concurrency_' + key]}{'+' if s[k]['max_concurrency_' + key + '_is_lower_bound'] else ''}"
                 for k in out["meta"]["servers"] if k in s]
        line = f"largest concurrency with {what} (every level up to it, no failed run): " + ", ".join(parts)
        if "netra" in s and "peer" in s:
            ratio = s.get(f"ratio_netra_peer_{key}")
            line += f"; netra/peer {ratio}" if ratio is not None else "; netra/peer: none (a lower bound)"
        _log(line)
    for kind in out["meta"]["servers"]:
        if kind in s and s[kind]["stopped"]:
            _log(f"{kind} stopped climbing: {s[kind]['stopped']}")
    if out["problems"]:
        _log()
        for p in out["problems"]:
            _log(f"PROBLEM: {p}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=50, help="text_delta chunks per run ([[stream:N]]; default 50)")
    p.add_argument("--delay-ms", type=float, default=20.0,
                   help="NETRA_SCRIPTED_DELAY_MS: wait before each chunk (default 20: 50 deltas/s per run)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)),
                   help=f"comma-separated concurrent streaming runs (default: {','.join(map(str, LEVELS))})")
    p.add_argument("--rounds", type=int, default=3, help="rounds per level; figures are medians (default: 3)")
    p.add_argument("--runs-per-user", type=int, default=3, help="runs each connection makes, one after another")
    p.add_argument("--slo-ms", type=float, default=100.0, help="delta p99 target for the headline figure")
    p.add_argument("--stop-ms", type=float, default=1000.0,
                   help="a server stops climbing past this median lateness p99 (default: 1000)")
    p.add_argument("--rate-slack", type=float, default=0.1,
                   help="the set rate counts as held while the mean gap is within this share of it (default: 0.1)")
    p.add_argument("--servers", default="netra,peer",
                   help="comma-separated, alternated, rotated each round (netra, peer, floor; default: netra,peer)")
    p.add_argument("--server-cpus", type=_cpus, default=None, help="CPUs of the server (default: 0)")
    p.add_argument("--client-cpus", type=_cpus, default=None, help="CPUs of the client (default: all others)")
    p.add_argument("--client-processes", type=int, default=1, help="client processes (default: 1)")
    p.add_argument("--client-limit", type=float, default=0.85,
                   help="client busy fraction from which the client may be the limit (default: 0.85)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the servers and clients (and their autogroups), e.g. -10 on a shared "
                        "machine (needs CAP_SYS_NICE; default 0)")
    p.add_argument("--netra-root", type=Path, default=None,
                   help="run the netra package of this source tree instead of this repository's")
    p.add_argument("--netra-label", help="what the measured netra is (e.g. the commit of an exported tree)")
    p.add_argument("--max-minutes", type=float, default=40.0, help="start no level after this long")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    if not args.servers or any(s not in KINDS for s in args.servers):
        p.error(f"--servers: some of {', '.join(KINDS)}")
    args.levels = sorted({int(x) for x in args.levels.split(",") if x})
    if (not args.levels or min(args.levels) < 1 or args.rounds < 1 or args.chunks < 1 or args.delay_ms <= 0
            or args.runs_per_user < 1):
        p.error("levels >= 1, --rounds, --chunks, --runs-per-user >= 1 and --delay-ms > 0, please")
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
    report(out, args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0 if all(s["failures"] == 0 for s in out["summary"].values() if isinstance(s, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
