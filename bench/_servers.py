"""Starting, watching and stopping the servers under test.

Every server is a child process on a free loopback port, in its own session
(process group) so that stopping it stops whatever it spawned, and with a
parent-death signal so that it dies with the bench even when the bench is
killed with no chance to run its ``finally``. Its CPU time is read from
``/proc/<pid>/stat`` (itself plus descendants), which costs the server
nothing, unlike any in-process probe would.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KINDS = ("netra", "peer", "floor")

#: Environment the bench gives netra unless the caller's environment says
#: otherwise: no store (as the peer and floor have none), a rate limit a
#: machine-speed user never hits (the bench's users send as fast as runs end),
#: and warnings only (the peer and floor do not log per connection either).
NETRA_DEFAULTS = {
    "NETRA_DATABASE_URL": "none",
    "NETRA_RATE_PER_S": "1000000",
    "NETRA_RATE_BURST": "1000000",
    "NETRA_RATE_ABUSE_LIMIT": "1000000",
    "NETRA_LOG_LEVEL": "WARNING",
}


def pdeathsig() -> None:
    """preexec_fn: have Linux send SIGTERM to the child when we die."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def set_priority(nice: int) -> None:
    """This process's niceness, and that of its autogroup: with
    ``kernel.sched_autogroup_enabled`` the scheduler first shares a core
    between sessions, so a niceness alone would not outweigh another
    session's work. Call it in a process that leads its own session, or it
    changes the whole session's group. Negative values need CAP_SYS_NICE."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass


def client_options(nice: int = 0) -> dict:
    """Options for ``trio.lowlevel.open_process`` of a client process: with
    ``nice``, it leads its own session (so its own autogroup) at that
    niceness, as the servers do. No parent-death signal here: trio starts a
    process from a worker thread, and that signal fires when the thread that
    started the child exits (an idle worker thread does after a few seconds),
    not the bench."""
    if not nice:
        return {}

    def preexec() -> None:
        set_priority(nice)

    return {"preexec_fn": preexec, "start_new_session": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of ``pid`` and its live descendants, in seconds."""
    if pid is None:
        return None
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, busy + idle) CPU seconds of the whole machine since boot, from
    /proc/stat. Its busy time includes what no process is charged for
    (softirq work of loopback TCP) and whatever else runs on the machine,
    which per-process figures would hide."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


@dataclass
class Server:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def command(kind: str, port: int) -> list[str]:
    if kind.startswith("netra"):
        return [sys.executable, "-m", "netra", "serve", "--host", HOST, "--port", str(port)]
    script = {"peer": "fastapi_peer.py", "floor": "raw_floor.py"}[kind]
    return [sys.executable, str(ROOT / "bench" / "peers" / script), "--host", HOST, "--port", str(port)]


def start(kind: str, *, secret: str, delay_ms: float, log_dir: Path,
          netra_defaults: dict[str, str] | None = None, netra_forced: dict[str, str] | None = None,
          netra_unset: tuple[str, ...] = (), netra_root: Path | None = None,
          cpus: set[int] | None = None, nofile: int | None = None, nice: int = 0) -> Server:
    """Start one server (not yet ready: see :func:`wait_ready`).

    For netra (any kind starting with ``netra``), ``netra_defaults`` (then
    :data:`NETRA_DEFAULTS`) apply unless the caller's environment sets the
    variable; ``netra_forced`` always applies; ``netra_unset`` removes
    variables (e.g. ``NETRA_DATABASE_URL``, for netra's default store);
    ``netra_root`` runs the netra package of another source tree. ``cpus``
    pins the server (and every thread and process it starts) to those CPUs;
    ``nofile`` sets its open-file limit (above the hard limit when we may,
    else capped at it); ``nice`` its scheduling niceness (negative: ahead of
    other work on the machine; needs CAP_SYS_NICE)."""
    port = free_port()
    env = dict(os.environ)
    root = ROOT
    if kind.startswith("netra"):
        for key, value in {**NETRA_DEFAULTS, **(netra_defaults or {})}.items():
            env.setdefault(key, value)
        env.update(netra_forced or {})
        for key in netra_unset:
            env.pop(key, None)
        root = netra_root or ROOT
    env["NETRA_JWT_SECRET"] = secret
    env["NETRA_SCRIPTED_DELAY_MS"] = str(delay_ms)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    log_path = log_dir / f"{kind}.log"

    def preexec() -> None:
        pdeathsig()
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nice:
            set_priority(nice)  # after setsid (start_new_session): the server's own autogroup
        if nofile:
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            try:  # above the hard limit only with CAP_SYS_RESOURCE (root)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(nofile, hard)))
            except (ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command(kind, port), cwd=root, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec)
    return Server(kind, port, proc, log_path)


def affinity_of(pid: int) -> dict[int, list[int]]:
    """CPUs each thread of ``pid`` and of its descendants may run on."""
    out: dict[int, list[int]] = {}
    for p in _descendants(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                out[int(task)] = sorted(os.sched_getaffinity(int(task)))
            except OSError:
                continue
    return out


async def _probe(server: Server) -> bool:
    """netra: GET /healthz answers 200; the others: a TCP connect succeeds."""
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream(HOST, server.port)
            async with stream:
                if not server.kind.startswith("netra"):
                    return True
                await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                head = await stream.receive_some(4096)
                return head.split(b" ", 2)[1:2] == [b"200"]
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, IndexError):
        return False


async def http_get(port: int, path: str, *, host: str = HOST, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """``GET path`` over a fresh loopback connection: (status, body). Enough
    HTTP/1.1 for the server's own small endpoints (/readyz, /metrics): a
    Content-Length or chunked body (hypercorn answers ``Connection: close``
    but may keep the socket open, so the body's end is found by length)."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()

            async def more() -> bool:
                chunk = await stream.receive_some(1 << 16)
                data.extend(chunk)
                return bool(chunk)

            while b"\r\n\r\n" not in data:
                if not await more():
                    raise OSError("connection closed before the response head")
            head, _, _ = bytes(data).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
            start = len(head) + 4
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                body, pos = bytearray(), start
                while True:
                    while b"\r\n" not in data[pos:]:
                        if not await more():
                            raise OSError("connection closed inside a chunked body")
                    eol = data.index(b"\r\n", pos)
                    size = int(bytes(data[pos:eol]).split(b";")[0], 16)
                    if size == 0:
                        return status, bytes(body)
                    while len(data) < eol + 2 + size + 2:
                        if not await more():
                            raise OSError("connection closed inside a chunked body")
                    body += data[eol + 2:eol + 2 + size]
                    pos = eol + 2 + size + 2
            length = int(headers.get(b"content-length", b"-1"))
            while length < 0 or len(data) < start + length:
                if not await more():
                    if length < 0:
                        break
                    raise OSError("connection closed inside the body")
            return status, bytes(data[start:start + length] if length >= 0 else data[start:])


def fd_count(pid: int | None) -> int | None:
    """Open file descriptors of ``pid`` (sockets included), from /proc/PID/fd."""
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}


def tcp_sockets(port: int) -> dict[str, int]:
    """TCP sockets whose local port is ``port`` (the server's side of its
    connections), by state, from /proc/net/tcp{,6}; LISTEN and TIME_WAIT
    left out. ``orphan:STATE`` are sockets no process holds any more (closed,
    the kernel still flushing them); the others are held open by a process."""
    out: dict[str, int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            state = _TCP_STATES.get(fields[3], fields[3])
            if state in ("LISTEN", "TIME_WAIT"):
                continue
            key = state if fields[9] != "0" else f"orphan:{state}"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def status_kib(pid: int | None, *keys: str) -> dict[str, int] | None:
    """Memory lines of /proc/PID/status (``VmRSS``, ``VmHWM``...) in KiB."""
    if pid is None:
        return None
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0])  # kB
    except OSError:
        return None
    return out


def rss_mib(pid: int | None) -> dict[str, float] | None:
    """VmRSS and VmHWM (peak) of ``pid`` in MiB."""
    kib = status_kib(pid, "VmRSS", "VmHWM")
    if kib is None:
        return None
    return {name: round(kib[key] / 1024, 1) if key in kib else None
            for name, key in (("rss", "VmRSS"), ("hwm", "VmHWM"))}


async def wait_ready(server: Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} exited with {server.proc.returncode}:\n{server.log_tail()}")
        if await _probe(server):
            return
        await trio.sleep(0.1)
    raise RuntimeError(f"{server.kind} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


def stop(server: Server, grace_s: float = 12.0) -> None:
    """SIGTERM (netra drains for up to drain_grace_s), then SIGKILL the group."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)  # the group we created for it
    except (ProcessLookupError, PermissionError):
        pass
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
