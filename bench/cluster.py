"""``python -m bench cluster``: a node of a cluster killed under load.

Starts ``--nodes`` netra processes (default 3) on loopback as one cluster
(one Redis, one PostgreSQL database made for the run and dropped after it,
a lease TTL of ``--ttl`` seconds), with cluster-wide caps small enough to
be contended (``--max-runs``, ``--max-runs-per-user``). Each node gets
``--users`` users of its own, driven by the load bench's client processes
(every event checked: seq, order, text, tool pairing, and that it belongs to
the user who reads it). ``--kill-after`` seconds into the load, the last
node is killed with SIGKILL.

What it judges, on the surviving nodes only: every run of their users
completed (100%), cross-user events 0. And afterwards: the cluster counts
one node fewer and no active run within the lease TTL (the dead node's
leases expired by themselves), and every run the dead node left running is
recorded failed with cause ``node_lost``, by the survivors' sweep.

Needs Redis and PostgreSQL (``--redis-url``, ``--database-url``: the local
ones by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import trio
from psycopg import sql

from . import _servers
from .load import run_scenario

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _database(admin_url: str, name: str, create: bool) -> str:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        if create:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl()


def _runs_by_outcome(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT status, coalesce(error_code, cancel_reason, '') AS why, count(*) FROM runs GROUP BY 1, 2"
        ).fetchall()
    return {f"{status}:{why}" if why else status: count for status, why, count in rows}


def _running_on_store(url: str) -> int:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0]


async def _runs_active(node: _servers.Server) -> float:
    try:
        _, body = await _servers.http_get(node.port, "/metrics")
    except (OSError, trio.TooSlowError):
        return 0.0
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("netra_runs_active "):
            return float(line.split()[1])
    return 0.0


async def _cluster_counts(node: _servers.Server) -> dict[str, float] | None:
    """The ``netra_cluster{kind=...}`` samples of a node's /metrics."""
    try:
        _, body = await _servers.http_get(node.port, "/metrics")
    except (OSError, trio.TooSlowError):
        return None
    counts = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("netra_cluster{"):
            name, _, value = line.partition(" ")
            counts[name.split('"')[1]] = float(value)
    return counts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    name = f"netra_bench_{secrets.token_hex(6)}"
    db_url = _database(args.database_url, name, True)
    prefix = f"netra-bench:{secrets.token_hex(6)}:"
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-cluster-"))
    forced = {
        "NETRA_DATABASE_URL": db_url, "NETRA_REDIS_URL": args.redis_url, "NETRA_REDIS_PREFIX": prefix,
        "NETRA_CLUSTER_LEASE_TTL_S": str(args.ttl), "NETRA_MAX_RUNS": str(args.max_runs),
        "NETRA_MAX_RUNS_PER_USER": str(args.max_runs_per_user), "NETRA_CHAOS_TOOLS": "true",
        "NETRA_STORE_POOL_SIZE": "4",
    }
    nodes: list[_servers.Server] = []
    out: dict[str, Any] = {}
    try:
        for n in range(args.nodes):
            node = _servers.start(f"netra-node{n + 1}", secret=secret, delay_ms=args.delay_ms, log_dir=log_dir,
                                  netra_forced=forced)
            nodes.append(node)
        for node in nodes:
            await _servers.wait_ready(node)
        victim = nodes[-1]
        results: dict[str, dict[str, Any]] = {}
        killed_at: list[float] = []

        async def load(node: _servers.Server) -> None:
            results[node.kind] = await run_scenario(
                name=node.kind, url=node.url, users=args.users, messages=args.messages,
                processes=args.client_processes, secret=secret, server_pid=node.proc.pid,
                run_timeout_s=args.run_timeout_s, timeout_s=args.timeout_s, nice=args.nice,
            )

        survivors = nodes[:-1]
        after: dict[str, Any] = {}

        async def kill() -> None:
            # once the victim is running runs of its users (the timed phase has begun)
            while not (await _runs_active(victim)):
                await trio.sleep(0.05)
            await trio.sleep(args.kill_after)
            running = await trio.to_thread.run_sync(_running_on_store, db_url)
            os.killpg(victim.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            after["runs_running_at_kill"] = running
            # the survivors see one node fewer once its key expires (one TTL), and record
            # its runs node_lost at their next sweep (once per TTL)
            deadline = killed + args.ttl * 4 + 10
            while time.monotonic() < deadline and ("node_gone_s" not in after or "runs_closed_s" not in after):
                counts = await _cluster_counts(survivors[0])
                if "node_gone_s" not in after and counts and counts.get("nodes") == len(survivors):
                    after["node_gone_s"] = round(time.monotonic() - killed, 2)
                outcome = await trio.to_thread.run_sync(_runs_by_outcome, db_url)
                if "runs_closed_s" not in after and outcome.get("failed:node_lost"):
                    after["runs_closed_s"] = round(time.monotonic() - killed, 2)
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(load, node)
            nursery.start_soon(kill)
        # no capacity leaked: with the load over, nothing is active anywhere
        counts: dict[str, float] | None = None
        with trio.move_on_after(args.ttl * 2 + 5):
            while True:
                counts = await _cluster_counts(survivors[0])
                if counts and counts.get("runs_active") == 0 and counts.get("nodes") == len(survivors):
                    break
                await trio.sleep(0.2)
        after["cluster_counts"] = counts
        after["runs"] = await trio.to_thread.run_sync(_runs_by_outcome, db_url)
        healthy = [results[node.kind] for node in survivors]
        out = {
            "bench": "cluster",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "nodes": {kind: _brief(r) for kind, r in results.items()},
            "killed": victim.kind,
            "healthy": {
                "runs_attempted": sum(r["runs_attempted"] for r in healthy),
                "runs_succeeded": sum(r["runs_succeeded"] for r in healthy),
                "success_rate": round(sum(r["runs_succeeded"] for r in healthy)
                                      / max(1, sum(r["runs_attempted"] for r in healthy)), 4),
                "cross_user_events": sum(r["cross_user_events"] for r in results.values()),
                "violations": {k: sum(r["violations"][k] for r in healthy) for k in healthy[0]["violations"]},
                "client_busy_max": max(r["client_busy_max"] for r in healthy),
            },
            "after_kill": after,
        }
        out["problems"] = _problems(out, args)
    finally:
        for node in nodes:
            _servers.stop(node)
        _database(args.database_url, name, False)
    return out


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("users", "runs_attempted", "runs_succeeded", "success_rate", "cross_user_events",
                              "runs_per_s", "ttc_ms", "client_cpu_s", "server_cpu_s", "client_busy_max",
                              "close_codes")}


def _problems(out: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    healthy = out["healthy"]
    if healthy["success_rate"] != 1.0:
        problems.append(f"healthy users completed {healthy['success_rate']:.2%} of their runs, not 100%")
    if healthy["cross_user_events"]:
        problems.append(f"{healthy['cross_user_events']} cross-user events")
    if any(healthy["violations"].values()):
        problems.append(f"event checks failed on healthy nodes: {healthy['violations']}")
    after = out["after_kill"]
    if after.get("node_gone_s") is None:
        problems.append("the survivors still counted the killed node after 4 TTLs")
    if not after["runs"].get("failed:node_lost") or after["runs"].get("running"):
        problems.append(f"the killed node's runs were not all recorded node_lost: {after['runs']}")
    counts = after.get("cluster_counts") or {}
    if counts.get("runs_active") != 0:
        problems.append(f"capacity still held after the load: {counts}")
    if healthy["client_busy_max"] >= 0.85:
        problems.append("a load client process was busy >= 85%: it may have been the bottleneck")
    return problems


def report(out: dict[str, Any]) -> None:
    print(f"cluster chaos: {len(out['nodes'])} nodes, {out['killed']} killed with SIGKILL "
          f"{out['settings']['kill_after']} s into the load (lease TTL {out['settings']['ttl']} s)")
    for kind, r in out["nodes"].items():
        mark = " (killed)" if kind == out["killed"] else ""
        print(f"  {kind}{mark}: {r['runs_succeeded']}/{r['runs_attempted']} runs completed, "
              f"{r['runs_per_s']} runs/s, ttc p50 {r['ttc_ms']['p50']} ms p99 {r['ttc_ms']['p99']} ms, "
              f"cross-user events {r['cross_user_events']}, client CPU {r['client_cpu_s']} s "
              f"(busiest client process {r['client_busy_max']:.0%}), server CPU {r['server_cpu_s']} s")
    h = out["healthy"]
    print(f"  healthy users on the surviving nodes: {h['runs_succeeded']}/{h['runs_attempted']} completed "
          f"({h['success_rate']:.2%}), cross-user events {h['cross_user_events']}")
    a = out["after_kill"]
    print(f"  the kill: {a.get('runs_running_at_kill')} runs of all nodes running in the store; the survivors counted one "
          f"node fewer after {a.get('node_gone_s')} s and recorded its runs node_lost after "
          f"{a.get('runs_closed_s')} s")
    print(f"  after the load: cluster counts {a.get('cluster_counts')}; runs in the store: {a.get('runs')}")
    print("  OK" if not out["problems"] else "  PROBLEMS: " + "; ".join(out["problems"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--users", type=int, default=40, help="users per node")
    parser.add_argument("--messages", type=int, default=15, help="messages per user")
    parser.add_argument("--client-processes", type=int, default=1, help="load client processes per node")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the scripted model's delay per chunk")
    parser.add_argument("--kill-after", type=float, default=2.0, help="seconds into the load")
    parser.add_argument("--ttl", type=float, default=3.0, help="lease TTL (NETRA_CLUSTER_LEASE_TTL_S)")
    parser.add_argument("--max-runs", type=int, default=64, help="cluster-wide run capacity")
    parser.add_argument("--max-runs-per-user", type=int, default=1)
    parser.add_argument("--run-timeout-s", type=float, default=60.0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--nice", type=int, default=0, help="niceness of the load client processes")
    parser.add_argument("--redis-url", default=os.environ.get("NETRA_BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--database-url", default=os.environ.get("NETRA_BENCH_DATABASE_URL", DEFAULT_DB),
                        help="a PostgreSQL database whose role may CREATE DATABASE")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    out = trio.run(run, args)
    report(out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
