"""``python -m bench.instructions``: the golden path's instructions per run.

On a shared machine (or a VM without hardware counters) server CPU time per
run moves with whatever else runs; the number of instructions the server
executes does not. This starts netra under ``valgrind --tool=callgrind``
with collection off, drives it with the hotpath bench's raw-socket client
(bench/_rawclient.py: N connections, each sending the calculator message
and the next one when ``agent_completed`` arrives), switches collection on
for the timed window only (``callgrind_control -i``) and divides the
instructions of that window by the runs whose frames arrived in it. The
callgrind output (``--out``) can be read with ``callgrind_annotate``; it
sees C functions only (the interpreter, the store's SQLite, the kernel
interface), so use ``py-spy`` or cProfile for which Python function.

    python -m bench.instructions --connections 100 --warmup 10 --duration 20
    python -m bench.instructions --store sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from . import _servers
from .hotpath import EVENTS_PER_RUN, Worker, _sleep_until

ROOT = Path(__file__).resolve().parent.parent


def _total(path: Path) -> int:
    total = 0
    for f in [path, *path.parent.glob(path.name + ".*")]:
        if not f.exists() or not (f == path or f.name[len(path.name) + 1:].isdigit()):
            continue
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the window (slow under valgrind)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the counted window")
    p.add_argument("--store", choices=("none", "sqlite"), default="none")
    p.add_argument("--netra-root", type=Path, default=ROOT)
    p.add_argument("--out", type=Path, default=None, help="keep callgrind's output here")
    p.add_argument("--cprofile", type=Path, default=None,
                   help="instead of callgrind: run the server under cProfile (the whole process) and "
                        "write its stats here, for which Python function")
    args = p.parse_args()

    secret = secrets.token_hex(16)
    port = _servers.free_port()
    work = Path(tempfile.mkdtemp(prefix="netra-instr-"))
    out = args.out or work / "callgrind.out"
    env = dict(os.environ)
    for key, value in _servers.NETRA_DEFAULTS.items():
        env.setdefault(key, value)
    env.update({"NETRA_JWT_SECRET": secret, "NETRA_SCRIPTED_DELAY_MS": "0",
                "NETRA_MAX_CONNECTIONS": str(max(10000, args.connections + 100)),
                "PYTHONPATH": str(args.netra_root)})
    if args.store == "sqlite":
        env.pop("NETRA_DATABASE_URL", None)
        env["NETRA_DATA_DIR"] = str(work / "data")
    else:
        env["NETRA_DATABASE_URL"] = "none"
    serve = _servers.command("netra", port)
    if args.cprofile:
        cmd = [serve[0], "-m", "cProfile", "-o", str(args.cprofile.resolve()), *serve[1:]]
    else:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *serve]
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=args.netra_root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = _servers.Server("netra", port, proc, work / "server.log")
    worker = None
    try:
        trio.run(lambda: _servers.wait_ready(server, timeout_s=180.0))
        spec = {"mode": "load", "io": "epoll", "host": _servers.HOST, "port": port, "prefix": f"instr-{os.getpid()}",
                "first_user": 1, "users": args.connections, "connect_concurrency": 50, "connect_phase_s": 300.0,
                "go_timeout_s": 300.0, "drain_timeout_s": 120.0, "close_timeout_s": 30.0}
        worker = Worker(spec, set(os.sched_getaffinity(0)), secret)
        worker.expect("READY", 300.0)
        t_go = time.monotonic() + 0.2
        t_warm, t_stop = t_go + args.warmup, t_go + args.warmup + args.duration
        worker.send(f"GO {t_go!r} {t_warm!r} {t_stop!r}")
        _sleep_until(t_warm)
        if not args.cprofile:
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        _sleep_until(t_stop)
        if not args.cprofile:
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        result = worker.expect("RESULT", 400.0)
    finally:
        if worker is not None:
            worker.reap()
        _servers.stop(server, grace_s=60.0)
        log.close()
    runs = result["window_frames"] / EVENTS_PER_RUN
    instr = 0 if args.cprofile else _total(out)
    report = {"connections": args.connections, "store": args.store, "runs_in_window": runs,
              "instructions": instr, "kinstr_per_run": round(instr / runs / 1000, 1) if runs else None,
              "failed": result.get("failed"), "seq_errors": result.get("seq_errors"),
              "verify_failed": result.get("verify_failed"), "callgrind_out": str(out)}
    print(json.dumps(report))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
