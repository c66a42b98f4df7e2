"""``python -m bench.stores``: what recording every run costs, per store backend.

The same golden-path scenario runs against netra with no store, with SQLite
(a fresh file) and with PostgreSQL (a fresh database on the server named by
``--postgres``, created here and dropped afterwards; skipped, and said so,
when it does not answer), alternating between them round by round in one
invocation. The JSON gives runs/s and latency per backend and each backend's
ratio to "none".
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from . import _servers
from . import _spawn
from .load import run_scenario

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_database(admin_url: str) -> tuple[str, str] | None:
    """Create a database of our own: (its URL, its name), or None if PostgreSQL is not there."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        return None
    name = f"netra_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        print(f"postgres skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl(), name


def _drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-stores-"))
    backends = {"none": "none", "sqlite": f"sqlite:///{log_dir}/netra.sqlite3"}
    pg = _postgres_database(args.postgres) if args.postgres else None
    if pg is not None:
        backends["postgres"] = pg[0]
    servers: dict[str, _servers.Server] = {}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
    try:
        for name, url in backends.items():
            servers[name] = _servers.start(
                "netra", secret=secret, delay_ms=0.0, log_dir=log_dir,
                netra_forced={"NETRA_DATABASE_URL": url, "NETRA_STORE_POOL_SIZE": str(args.pool)},
            )
        for server in servers.values():
            await _servers.wait_ready(server)
        order = list(backends)
        for round_ in range(args.rounds):
            for name in order[round_ % len(order):] + order[: round_ % len(order)]:
                row = await run_scenario(
                    name=f"stress-{args.users}", url=servers[name].url, users=args.users,
                    messages=args.messages, processes=args.processes, secret=secret,
                    server_pid=servers[name].proc.pid,
                )
                rows[name].append(row)
                print(f"{name:>9} round {round_ + 1}: {row['runs_succeeded']}/{row['runs_attempted']} "
                      f"{row['runs_per_s']} runs/s  ttc p50 {row['ttc_ms']['p50']} p99 {row['ttc_ms']['p99']} ms",
                      file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            _servers.stop(server)
        if pg is not None:
            _drop_database(args.postgres, pg[1])
    summary: dict[str, Any] = {}
    for name, results in rows.items():
        summary[name] = {
            "runs_per_s_median": statistics.median(r["runs_per_s"] for r in results),
            "ttc_p99_ms_median": statistics.median(r["ttc_ms"]["p99"] for r in results),
            "success_rate": min(r["success_rate"] for r in results),
            "rounds": len(results),
        }
    base = summary["none"]["runs_per_s_median"]
    for name in summary:
        summary[name]["ratio_to_none"] = round(summary[name]["runs_per_s_median"] / base, 3) if base else None
    return {
        "meta": {"users": args.users, "messages_per_user": args.messages, "rounds": args.rounds,
                 "store_pool_size": args.pool, "postgres": "tested" if pg else "not available",
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "summary": summary,
        "rounds": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stores", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="rounds per backend, alternating (median reported)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--pool", type=int, default=8, help="NETRA_STORE_POOL_SIZE")
    p.add_argument("--postgres", default=DEFAULT_POSTGRES,
                   help="an admin URL on a PostgreSQL allowed to CREATE DATABASE ('' to skip)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    out = trio.run(_bench, args)
    _spawn.write_result(out, args.json)
    return 0 if all(s["success_rate"] == 1.0 for s in out["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
