"""``python -m bench``: netra's load benchmark, beside its two yardsticks.

Why yardsticks: a figure like "900 runs/s" says nothing alone on a 2-core
machine. The same client, scenarios and scripted events are run against
netra, a FastAPI + uvicorn peer (what a team would otherwise write) and a
raw hypercorn/trio floor (the least the same stack can do), alternating
between them in one invocation so that they share the machine's state; the
JSON then carries netra/peer and netra/floor ratios.

The JSON goes to stdout (and ``--json PATH``); progress goes to stderr.
See bench/README.md for what every figure means. ``python -m bench chaos
...`` runs the chaos benchmark instead (bench/chaos.py), ``python -m bench
hotpath`` the pinned-core golden-path benchmark with the raw-socket client
(bench/hotpath.py) and ``python -m bench framing`` the framing and JSON
micro-benchmark (bench/framing.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import _servers
from .load import run_scenario

SEED_USERS = (1, 3, 5, 8)


def _scenarios(spec: str) -> list[tuple[str, int]]:
    """``seed,100,1000`` -> [(seed-1, 1), ..., (stress-100, 100), (stress-1000, 1000)]."""
    out: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "seed":
            out += [(f"seed-{n}", n) for n in SEED_USERS]
        elif part.isdigit() and int(part) > 0:
            out.append((f"stress-{part}", int(part)))
        else:
            raise argparse.ArgumentTypeError(f"unknown scenario {part!r} (use seed or a user count)")
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", metavar="URL", help="an already running server (ws://127.0.0.1:P/ws); "
                       "tokens are signed with $NETRA_JWT_SECRET")
    where.add_argument("--server", choices=(*_servers.KINDS, "all"), default="all",
                       help="start these servers on free loopback ports (default: all, alternating)")
    p.add_argument("--scenarios", type=_scenarios, default=_scenarios("seed,100,1000"),
                   help="comma-separated: seed (1,3,5,8 users) and/or user counts (default: seed,100,1000)")
    p.add_argument("--messages", type=int, default=20, help="messages per user (default: 20)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="NETRA_SCRIPTED_DELAY_MS for started servers")
    p.add_argument("--processes", type=int, default=2, help="client processes (default: 2)")
    p.add_argument("--connect-concurrency", type=int, default=100, help="connects in flight at once, all processes")
    p.add_argument("--run-timeout", type=float, default=60.0, help="seconds one run may take")
    p.add_argument("--scenario-timeout", type=float, default=600.0, help="seconds one timed phase may take")
    p.add_argument("--server-pid", type=int, help="with --target: read this process's CPU time")
    p.add_argument("--json", metavar="PATH", help="also write the JSON here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of runs/s and latency against concurrency")
    args = p.parse_args(argv)
    if args.messages < 1 or args.processes < 1 or args.connect_concurrency < 1:
        p.error("--messages, --processes and --connect-concurrency must be >= 1")
    if args.target:
        if not args.target.startswith(("ws://127.", "ws://localhost", "ws://[::1]")):
            p.error("--target must be a loopback ws:// URL")
        if not os.environ.get("NETRA_JWT_SECRET"):
            p.error("--target needs NETRA_JWT_SECRET (the key the server verifies tokens with)")
    return args


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _line(server: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{server:>6} {r['scenario']:<12} ERROR {r['error'][:200]}"
    return (f"{server:>6} {r['scenario']:<12} ok {r['runs_succeeded']}/{r['runs_attempted']} "
            f"{r['runs_per_s']:>8.1f} runs/s  ttc p50 {r['ttc_ms']['p50']} p99 {r['ttc_ms']['p99']} ms  "
            f"cpu client {r['client_cpu_s']} s server {r['server_cpu_s']} s  "
            f"busy client {r['client_busy_max']} server {r['server_busy']}  x-user {r['cross_user_events']}")


def _ratios(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """netra/peer and netra/floor, per scenario, for runs/s and p99 ttc.
    runs/s above 1 is netra ahead; p99 below 1 is netra ahead."""
    by = {s: {r["scenario"]: r for r in rows if "error" not in r} for s, rows in results.items()}
    out: dict[str, Any] = {}
    for name, mine in by.get("netra", {}).items():
        entry: dict[str, Any] = {"runs_per_s": {}, "ttc_p99": {}}
        for other in ("peer", "floor"):
            theirs = by.get(other, {}).get(name)
            if theirs is None:
                continue
            key = f"netra/{other}"
            if theirs["runs_per_s"]:
                entry["runs_per_s"][key] = round(mine["runs_per_s"] / theirs["runs_per_s"], 3)
            if mine["ttc_ms"]["p99"] and theirs["ttc_ms"]["p99"]:
                entry["ttc_p99"][key] = round(mine["ttc_ms"]["p99"] / theirs["ttc_ms"]["p99"], 3)
        out[name] = entry
    return out


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    kinds = ["target"] if args.target else list(_servers.KINDS if args.server == "all" else (args.server,))
    secret = os.environ.get("NETRA_JWT_SECRET", "") if args.target else secrets.token_urlsafe(32)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    servers: dict[str, _servers.Server] = {}
    broken: dict[str, str] = {}  # server kind -> why it could not be benchmarked
    log_dir = Path(tempfile.mkdtemp(prefix="netra-bench-"))
    started = time.time()
    try:
        if not args.target:
            _log(f"server logs: {log_dir}")
            for kind in kinds:
                servers[kind] = _servers.start(kind, secret=secret, delay_ms=args.delay_ms, log_dir=log_dir)
            for server in servers.values():
                try:
                    await _servers.wait_ready(server)
                    _log(f"{server.kind} ready on {server.url} (pid {server.proc.pid})")
                except RuntimeError as exc:  # the others still run: their figures are still worth having
                    broken[server.kind] = str(exc).splitlines()[0]
                    _log(str(exc))
        for i, (name, users) in enumerate(args.scenarios):
            order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]  # rotate: no server always goes first
            for kind in order:
                server = servers.get(kind)
                if kind in broken or (server is not None and server.proc.poll() is not None):
                    reason = broken.get(kind) or f"{kind} exited with {server.proc.returncode}"
                    row: dict[str, Any] = {"scenario": name, "users": users, "error": reason}
                else:
                    try:
                        row = await run_scenario(
                            name=name, url=server.url if server else args.target, users=users,
                            messages=args.messages, processes=args.processes, secret=secret,
                            server_pid=server.proc.pid if server else args.server_pid,
                            run_timeout_s=args.run_timeout, connect_concurrency=args.connect_concurrency,
                            timeout_s=args.scenario_timeout)
                    except Exception as exc:  # noqa: BLE001 - one failed scenario must not lose the others
                        row = {"scenario": name, "users": users, "error": f"{type(exc).__name__}: {exc}"}
                results[kind].append(row)
                _log(_line(kind, row))
    finally:
        for server in servers.values():
            _servers.stop(server)
    out: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "servers": kinds,
            "target": args.target,
            "messages_per_user": args.messages,
            "delay_ms": args.delay_ms,
            "client_processes": args.processes,
            "connect_concurrency": args.connect_concurrency,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "netra_env": {k: v for k, v in _servers.NETRA_DEFAULTS.items()} | {
                k: v for k, v in os.environ.items() if k.startswith("NETRA_") and k != "NETRA_JWT_SECRET"},
        },
        "results": results,
    }
    if "netra" in results and len(results) > 1:
        out["ratios"] = _ratios(results)
        for name, entry in out["ratios"].items():
            _log(f"ratio {name:<12} runs/s {entry['runs_per_s']}  p99 ttc {entry['ttc_p99']}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:  # python -m bench chaos ...: healthy users beside faulty ones
        from .chaos import main as chaos_main

        return chaos_main(argv[1:])
    if argv[:1] == ["hotpath"]:  # python -m bench hotpath ...: pinned cores, raw-socket client
        from .hotpath import main as hotpath_main

        return hotpath_main(argv[1:])
    if argv[:1] == ["workers"]:  # python -m bench workers: netra serve --workers 1 against --workers 2
        from .workers import main as workers_main

        return workers_main(argv[1:])
    if argv[:1] == ["cluster"]:  # python -m bench cluster: a cluster node killed under load
        from .cluster import main as cluster_main

        return cluster_main(argv[1:])
    if argv[:1] == ["framing"]:  # python -m bench framing: WebSocket framing and JSON encoding costs
        from .framing import main as framing_main

        return framing_main(argv[1:])
    args = _parse(argv)
    try:
        out = trio.run(_bench, args)
    except KeyboardInterrupt:  # servers and workers were already stopped by _bench's finally
        _log("interrupted")
        return 130
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if args.plot:
        from ._plot import plot

        plot(out["results"], args.plot, title=f"netra bench: {args.messages} msgs/user, "
             f"delay {args.delay_ms:g} ms, {args.processes} client procs, {os.cpu_count()} cpus")
        _log(f"plot written to {args.plot}")
    failed = any("error" in r for rows in out["results"].values() for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
