"""Plumbing shared by the standalone benchmarks ``bench.streaming``,
``bench.idle`` and ``bench.soak``: client worker processes that speak one
JSON document per line (``TAG {...}``) on stdout and read commands on stdin,
the file-descriptor limit, and small /proc and /readyz readers.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from . import _servers
from .load import LineReader, cpu_self, emit  # noqa: F401  (the workers' shared helpers)

ROOT = Path(__file__).resolve().parent.parent


def raise_nofile() -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def spawn(module: str, specs: list[dict[str, Any]], secret: str,
                nice: int = 0) -> list[tuple[trio.Process, LineReader]]:
    env = {**os.environ, "NETRA_JWT_SECRET": secret,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = []
    for spec in specs:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", module, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(ROOT),
            **_servers.client_options(nice))
        out.append((proc, LineReader(proc.stdout)))
    return out


async def expect(reader: LineReader, tag: str) -> dict[str, Any]:
    got, _, body = (await reader.readline()).partition(" ")
    if got != tag:
        raise RuntimeError(f"worker said {got!r} instead of {tag}")
    return json.loads(body)


async def reap(workers: list[tuple[trio.Process, LineReader]], grace_s: float = 10.0) -> None:
    """Wait for the workers to exit; kill those that do not (always called in a finally)."""
    with trio.move_on_after(grace_s):
        for proc, _ in workers:
            await proc.wait()
    for proc, _ in workers:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5):
            await proc.wait()


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def nofile_of(pid: int) -> int | None:
    """The soft 'Max open files' of a running process."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None




async def readyz(server: _servers.Server) -> dict[str, Any] | None:
    if server.kind != "netra":
        return None
    try:
        status, body = await _servers.http_get(server.port, "/readyz")
        return json.loads(body)
    except (OSError, ValueError, trio.TooSlowError):
        return None


async def metrics(server: _servers.Server, names: tuple[str, ...]) -> dict[str, float] | None:
    """Selected unlabelled samples from netra's /metrics."""
    if server.kind != "netra":
        return None
    try:
        _, body = await _servers.http_get(server.port, "/metrics")
    except (OSError, trio.TooSlowError):
        return None
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name in names:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


class MachineBusy:
    """Share of the machine's CPU time that was busy between start and stop."""

    def __init__(self) -> None:
        self.m0 = _servers.machine_cpu()

    def stop(self) -> float | None:
        m1 = _servers.machine_cpu()
        total = m1[1] - self.m0[1]
        return round((m1[0] - self.m0[0]) / total, 3) if total > 0 else None


def write_result(out: dict, json_path: str | None) -> None:
    """A benchmark's result: the summary on stderr, everything on stdout and,
    with ``--json PATH``, in that file."""
    import json
    import sys
    from pathlib import Path

    print(json.dumps(out["summary"], indent=2), file=sys.stderr)
    text = json.dumps(out, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")

