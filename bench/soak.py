"""``python -m bench.soak``: a long run of the golden path, watching for drift and leftovers.

``--runs`` runs (100,000 by default) against netra, in ``--segments``
segments (10): each segment is one golden-path scenario of the load bench
(``--users`` users, one connection each, each sending its share of the
segment's messages one after another, every message calling the calculator
tool, every event checked against protocol v1), so every segment also opens
and closes all its connections. Before the first segment and after each one
(after ``--settle-s``), the bench samples the server's RSS (VmRSS, and VmHWM
the peak), its open file descriptors, and for netra /readyz (connections,
users, runs_borrowed, queued_runs, ...) and /metrics (netra_runs_active,
netra_outbox_queued, netra_connections_open, and netra_trio_tasks, every live
trio task of the server process, counted when scraped).

``--store none`` (the default, like the other load benches) runs netra
without a store, so it remembers accepted message ids in memory, up to
50,000; ``--store sqlite`` runs the default deployment, where the store keeps
them and the server keeps none.

Reported: RSS drift = last sample - sample after the first segment
(warm-up), in MiB and %, and over the second half of the segments alone;
trio task drift (last - after warm-up); runs/s per segment and their spread, failures
(runs attempted - runs that passed every check; target 0) and leftovers
after the final settle (target all 0). The same load is then run against the
FastAPI peer (``--no-peer`` to skip) for comparison.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers, _spawn
from .hotpath import netra_source
from .load import run_scenario

METRICS = ("netra_runs_active", "netra_outbox_queued", "netra_connections_open", "netra_trio_tasks")


async def _sample(server: _servers.Server, label: str, runs_done: int) -> dict[str, Any]:
    pid = server.proc.pid
    mem = _servers.rss_mib(pid) or {}
    out: dict[str, Any] = {"at": label, "runs_done": runs_done, "rss_mib": mem.get("rss"), "hwm_mib": mem.get("hwm"),
                           "fds": _servers.fd_count(pid)}
    ready = await _spawn.readyz(server)
    if ready is not None:
        out["readyz"] = {k: v for k, v in ready.items() if k not in ("ready", "problems")}
    m = await _spawn.metrics(server, METRICS)
    if m is not None:
        out["metrics"] = m
    return out


async def _soak(kind: str, args: argparse.Namespace, secret: str, log_dir: Path) -> dict[str, Any]:
    per_segment = max(1, args.runs // args.segments)
    messages = max(1, per_segment // args.users)
    forced = {"NETRA_MAX_CONNECTIONS": str(args.users * 2 + 100)}
    if args.store == "sqlite":
        forced["NETRA_DATABASE_URL"] = f"sqlite:///{log_dir}/soak.sqlite3"
    server = _servers.start(kind, secret=secret, delay_ms=args.delay_ms, log_dir=log_dir, netra_forced=forced,
                            netra_root=args.netra_root, nice=args.nice)
    samples: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    busy = _spawn.MachineBusy()
    t0 = time.monotonic()
    try:
        await _servers.wait_ready(server)
        samples.append(await _sample(server, "start", 0))
        done = 0
        for i in range(args.segments):
            row = await run_scenario(name=f"soak-{kind}-s{i}", url=server.url, users=args.users,
                                     messages=messages, processes=args.processes, secret=secret,
                                     server_pid=server.proc.pid, timeout_s=args.segment_timeout_s, nice=args.nice)
            done += row["runs_attempted"]
            await trio.sleep(args.settle_s)
            samples.append(await _sample(server, f"after segment {i + 1}", done))
            failures = row["runs_attempted"] - row["runs_succeeded"]
            segments.append({"segment": i + 1, "runs_attempted": row["runs_attempted"],
                             "runs_succeeded": row["runs_succeeded"], "failures": failures,
                             "runs_per_s": row["runs_per_s"],
                             "runs_per_server_cpu_s": round(row["runs_succeeded"] / row["server_cpu_s"], 1)
                             if row["server_cpu_s"] else None,
                             "ttc_ms": row["ttc_ms"], "wall_s": row["wall_s"],
                             "server_busy": row["server_busy"], "client_busy_max": row["client_busy_max"],
                             "machine_busy": row["machine_busy"], "violations": {k: v for k, v in row["violations"].items() if v},
                             "errors": row["errors"], "close_codes": row["close_codes"],
                             "cross_user_events": row["cross_user_events"]})
            s = samples[-1]
            print(f"{kind:>6} segment {i + 1}/{args.segments}: {row['runs_succeeded']}/{row['runs_attempted']} "
                  f"{row['runs_per_s']} runs/s  rss {s['rss_mib']} MiB  fds {s['fds']}  "
                  f"readyz {s.get('readyz')}  metrics {s.get('metrics')}", file=sys.stderr, flush=True)
        await trio.sleep(args.final_settle_s)
        samples.append(await _sample(server, "end (settled)", done))
    finally:
        _servers.stop(server)
    wall = time.monotonic() - t0
    warm, end = samples[1]["rss_mib"], samples[-1]["rss_mib"]
    half = samples[max(1, len(samples) // 2)]["rss_mib"]
    tasks = [(s.get("metrics") or {}).get("netra_trio_tasks") for s in samples]
    rates = [s["runs_per_s"] for s in segments]
    per_cpu = [s["runs_per_server_cpu_s"] or 0.0 for s in segments]
    last = samples[-1]
    # the store's pool and files open on first use: compare with after warm-up too
    leftovers: dict[str, Any] = {"fds_vs_start": (last["fds"] or 0) - (samples[0]["fds"] or 0),
                                 "fds_vs_warmup": (last["fds"] or 0) - (samples[1]["fds"] or 0)}
    if "readyz" in last:
        leftovers.update({k: last["readyz"].get(k) for k in
                          ("connections", "users", "runs_borrowed", "model_borrowed", "tools_borrowed", "queued_runs")})
    if "metrics" in last:
        leftovers.update({k: last["metrics"].get(k) for k in METRICS})
    return {
        "server": kind,
        "runs_attempted": sum(s["runs_attempted"] for s in segments),
        "runs_succeeded": sum(s["runs_succeeded"] for s in segments),
        "failures": sum(s["failures"] for s in segments),
        "cross_user_events": sum(s["cross_user_events"] for s in segments),
        "wall_s": round(wall, 1),
        "rss_mib": {"start": samples[0]["rss_mib"], "after_warmup": warm, "end": end,
                    "peak_hwm": max(s["hwm_mib"] or 0 for s in samples)},
        "rss_drift_mib": round(end - warm, 1) if warm is not None and end is not None else None,
        "rss_drift_pct": round(100 * (end - warm) / warm, 2) if warm else None,
        "rss_drift_second_half_mib": round(end - half, 1) if half is not None and end is not None else None,
        "trio_tasks": {"start": tasks[0], "after_warmup": tasks[1], "end": tasks[-1],
                       "max_after_segment": max((t for t in tasks[1:-1] if t is not None), default=None)},
        "trio_tasks_drift": tasks[-1] - tasks[1] if None not in (tasks[1], tasks[-1]) else None,
        "runs_per_s": {"per_segment": rates, "median": round(statistics.median(rates), 1) if rates else None,
                       "min_over_max": round(min(rates) / max(rates), 3) if rates and max(rates) else None,
                       "last_over_first": round(rates[-1] / rates[0], 3) if rates and rates[0] else None},
        "runs_per_server_cpu_s": {"per_segment": per_cpu,
                                  "median": round(statistics.median(per_cpu), 1) if per_cpu else None,
                                  "last_over_first": round(per_cpu[-1] / per_cpu[0], 3) if per_cpu and per_cpu[0] else None},
        "leftovers_after_settle": leftovers,
        "machine_busy": busy.stop(),
        "segments": segments,
        "samples": samples,
    }


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-soak-"))
    results = {"netra": await _soak("netra", args, secret, log_dir)}
    if args.peer:
        results["peer"] = await _soak("peer", args, secret, log_dir)
    summary = {kind: {k: r[k] for k in ("runs_attempted", "failures", "rss_drift_mib", "rss_drift_pct",
                                        "rss_drift_second_half_mib", "trio_tasks_drift", "wall_s")}
               | {"runs_per_s_median": r["runs_per_s"]["median"], "runs_per_s_min_over_max": r["runs_per_s"]["min_over_max"],
                  "runs_per_server_cpu_s_median": r["runs_per_server_cpu_s"]["median"],
                  "runs_per_server_cpu_s_last_over_first": r["runs_per_server_cpu_s"]["last_over_first"],
                  "leftovers_after_settle": r["leftovers_after_settle"]}
               for kind, r in results.items()}
    if "peer" in results and results["peer"]["runs_per_s"]["median"]:
        summary["ratio_netra_peer_runs_per_s"] = round(
            results["netra"]["runs_per_s"]["median"] / results["peer"]["runs_per_s"]["median"], 3)
    return {
        "meta": {"runs": args.runs, "segments": args.segments, "netra_store": args.store, "users": args.users, "processes": args.processes,
                 "delay_ms": args.delay_ms, "settle_s": args.settle_s, "final_settle_s": args.final_settle_s,
                 "netra_source": netra_source(args.netra_root or _servers.ROOT) | (
                     {"label": args.netra_label} if args.netra_label else {}), "nice": args.nice,
                 "log_dir": str(log_dir), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "summary": summary,
        "servers": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100_000, help="runs per server, all segments")
    p.add_argument("--segments", type=int, default=10, help="samples are taken after each segment")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--delay-ms", type=float, default=0.0, help="NETRA_SCRIPTED_DELAY_MS")
    p.add_argument("--settle-s", type=float, default=2.0, help="wait after a segment before sampling")
    p.add_argument("--final-settle-s", type=float, default=5.0)
    p.add_argument("--segment-timeout-s", type=float, default=900.0)
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also soak the FastAPI peer with the same load (--no-peer to skip)")
    p.add_argument("--store", choices=("none", "sqlite"), default="none",
                   help="netra's store: none (ids kept in memory, bounded) or sqlite (the default deployment)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the servers and of the client processes (and their autogroups), e.g. -10 "
                        "on a machine shared with other work (needs CAP_SYS_NICE; default 0)")
    p.add_argument("--netra-root", type=Path, default=None,
                   help="run the netra package of this source tree instead of this repository's")
    p.add_argument("--netra-label", help="what the measured netra is (e.g. the commit of an exported tree)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.netra_root is not None:
        args.netra_root = args.netra_root.resolve()
        if not (args.netra_root / "netra" / "__init__.py").exists():
            p.error("--netra-root must hold a netra/ package")
    out = trio.run(_bench, args)
    _spawn.write_result(out, args.json)
    netra = out["servers"]["netra"]
    left = netra["leftovers_after_settle"]
    clean = all(not left.get(k) for k in ("connections", "runs_borrowed", "queued_runs"))
    return 0 if netra["failures"] == 0 and clean else 1


if __name__ == "__main__":
    sys.exit(main())
