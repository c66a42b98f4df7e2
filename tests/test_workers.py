"""``netra serve --workers N``: a supervisor and N worker processes on one
port, as an operator runs them: real processes, real sockets, real signals.

Which worker holds a connection is read from the kernel: the worker's open
file descriptors (``/proc/PID/fd``) against the established sockets of the
port (``/proc/net/tcp``), matched by the client's own port.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from netra.auth import mint_token
from netra.client import connect
from netra.config import Config
from netra.transport import Listener, ListenerLimits
from netra.workers import (
    SPLIT_LIMITS,
    limits_line,
    reserve_port,
    split_limits,
    worker_count,
)

from .test_serve import SECRET, STEP_S, child_env, free_port, netra

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads which process holds a socket from /proc (Linux)"
)

GOLDEN = 'what is [[tool:calculator {"expression": "6*7"}]]'
HANG = "[[tool:hang {}]]"


def keyed_env(**extra: str) -> dict[str, str]:
    """A server with a key (no development mode), no store, the fault tools."""
    return child_env(NETRA_JWT_SECRET=SECRET, NETRA_DATABASE_URL="none", NETRA_CHAOS_TOOLS="1", **extra)


# -- a supervisor as a test runs it ------------------------------------------------


@attrs.define(eq=False)
class Supervised:
    process: trio.Process
    stderr: bytearray = attrs.field(factory=bytearray)
    ended: bool = False  # stderr read to its end
    grew: trio.Event = attrs.field(factory=trio.Event)
    http_url: str = ""
    ws_url: str = ""
    port: int = 0
    pids: list[int] = attrs.field(factory=list)

    @property
    def text(self) -> str:
        return self.stderr.decode(errors="replace")

    async def wait_for(self, pattern: str, *, timeout: float = STEP_S) -> re.Match[str]:
        """The first match of ``pattern`` (multiline) in stderr, waiting for it."""
        with trio.fail_after(timeout):
            while True:
                found = re.search(pattern, self.text, re.MULTILINE)
                if found:
                    return found
                if self.ended:
                    raise AssertionError(f"netra exited ({self.process.returncode}) without {pattern!r}:\n{self.text}")
                self.grew = trio.Event()
                await self.grew.wait()

    async def wait_exit(self, timeout: float = STEP_S) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    def token(self, user: str) -> str:
        return mint_token(SECRET, user)


@asynccontextmanager
async def supervised(*args: str, cwd: Path, env: dict[str, str], ready: bool = True) -> AsyncIterator[Supervised]:
    """``netra serve ARGS``, its stderr collected; with ``ready``, once it
    printed its URL (and, with workers, their pids). Killed on the way out
    if the test left it running."""
    argv = [sys.executable, "-m", "netra", "serve", *args]
    process = await trio.lowlevel.open_process(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = Supervised(process=process)
    try:
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                assert process.stderr is not None
                async for chunk in process.stderr:
                    run.stderr.extend(chunk)
                    run.grew.set()
                run.ended = True
                run.grew.set()

            nursery.start_soon(pump)
            if ready:
                run.http_url = (await run.wait_for(r"^netra \S+ listening on (http://\S+)$")).group(1)
                run.ws_url = (await run.wait_for(r"^  WebSocket: (ws://\S+)$")).group(1)
                run.port = int(run.http_url.rsplit(":", 1)[1])
                workers = re.search(r"^  Workers:   \d+, pids ([\d ]+)$", run.text, re.MULTILINE)
                run.pids = [int(p) for p in workers.group(1).split()] if workers else []
            yield run
            with trio.fail_after(STEP_S):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STEP_S):
                await process.wait()
        for pid in run.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- what the kernel says -----------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry))
    return found


def holders(pids: list[int], port: int) -> dict[int, int]:
    """{client port: pid of the worker holding that connection} for every
    established connection to ``port`` that one of ``pids`` holds."""
    owner: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[int(link[8:-1])] = pid
    held: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in owner:
                held[int(remote.rsplit(":", 1)[1], 16)] = owner[inode]
    return held


async def spread(stack: AsyncExitStack, run: Supervised, pids: list[int], *, each: int, token=None,
                 users: str = "u") -> dict[int, list]:
    """Open connections (each its own user, unless ``token`` is given) until
    every one of ``pids`` holds ``each``: {pid: [connection, ...]}."""
    by_pid: dict[int, list] = {pid: [] for pid in pids}
    for n in range(64):
        conn = await stack.enter_async_context(connect(run.ws_url, token or run.token(f"{users}{n}")))
        pid = holders(pids, run.port)[conn.ws.local.port]
        by_pid[pid].append(conn)
        if all(len(held) >= each for held in by_pid.values()):
            return by_pid
    raise AssertionError(f"64 connections did not reach every worker: { {p: len(c) for p, c in by_pid.items()} }")


async def until(stream, kind: str):
    async for event in stream:
        if event.type == kind:
            return event
    raise AssertionError(f"no {kind}")


async def golden_path(conn) -> None:
    events = await conn.collect(GOLDEN)
    types = [e.type for e in events]
    assert types[0] == "agent_started" and types[-1] == "agent_completed", types
    assert {"agent_thinking", "tool_executing", "tool_completed"} <= set(types)
    assert "42" in events[-1].raw["text"]


# -- N workers on one port ------------------------------------------------------------


async def test_two_workers_accept_on_one_port_and_serve_the_golden_path(tmp_path):
    """On the defaults (development mode, SQLite in ./data): the supervisor
    prints the URL once, both workers accept, `netra token` mints tokens
    they accept, and both write to the one database."""
    port = await free_port()
    async with supervised("--workers", "2", "--port", port, cwd=tmp_path, env=child_env()) as run:
        assert run.port == int(port)
        assert len(re.findall(r"^netra \S+ listening on ", run.text, re.MULTILINE)) == 1
        assert len(set(run.pids)) == 2 and sorted(children(run.process.pid)) == sorted(run.pids)
        assert "signing key created in" in run.text  # by the supervisor; the workers reuse it

        minted = await netra("token", "--user", "alice", cwd=tmp_path, env=child_env())
        assert minted.returncode == 0, minted.stderr.decode()
        token = minted.stdout.decode().strip()
        with trio.fail_after(STEP_S):
            async with AsyncExitStack() as stack:
                by_pid = await spread(stack, run, run.pids, each=1, token=token)
                for held in by_pid.values():
                    assert held[0].user_id == "alice"
                    await golden_path(held[0])
            async with httpx.AsyncClient(base_url=run.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
                threads = (await http.get("/api/threads")).json()["threads"]
        assert len(threads) == 2  # one per worker, both in the shared SQLite database
        run.process.send_signal(signal.SIGTERM)
        assert await run.wait_exit() == 0


async def test_a_killed_worker_is_started_again_and_the_other_keeps_its_connections(tmp_path):
    async with supervised("--workers", "2", "--port", "0", cwd=tmp_path, env=keyed_env()) as run:
        with trio.fail_after(3 * STEP_S):
            async with AsyncExitStack() as stack:
                by_pid = await spread(stack, run, run.pids, each=2)
                victim, survivor = run.pids
                os.kill(victim, signal.SIGKILL)

                for conn in by_pid[victim]:
                    closed = await conn.wait_closed()
                    assert closed.code != 1001  # cut, not drained
                for conn in by_pid[survivor]:  # untouched: same connections, runs as before
                    await conn.ping()
                    await golden_path(conn)
                    assert conn.closed is None

                found = await run.wait_for(r'"msg": "worker (\d) started again: pid (\d+)"')
                replacement = int(found.group(2))
                run.pids.append(replacement)
                assert replacement not in (victim, survivor) and alive(replacement)
                assert re.search(rf"worker {found.group(1)} \(pid {victim}\) was killed by SIGKILL: starting another",
                                 run.text)
                assert sorted(children(run.process.pid)) == sorted([survivor, replacement])

                # new connections reach both the survivor and the new worker
                fresh = await spread(stack, run, [survivor, replacement], each=1, users="new")
                for held in fresh.values():
                    await golden_path(held[0])
        run.process.send_signal(signal.SIGTERM)
        assert await run.wait_exit() == 0


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_zero(tmp_path):
    env = keyed_env(NETRA_DRAIN_GRACE_S="2.0")
    async with supervised("--workers", "2", "--port", "0", cwd=tmp_path, env=env) as run:
        with trio.fail_after(2 * STEP_S):
            async with AsyncExitStack() as stack:
                by_pid = await spread(stack, run, run.pids, each=3)
                conns = [conn for held in by_pid.values() for conn in held]
                short, long = [], []
                for held in by_pid.values():
                    short.append(held[0].run('[[tool:sleep {"ms": 200}]]'))
                    long.append(held[1].run(HANG))  # held[2] stays idle
                for stream in short + long:
                    await until(stream, "tool_executing")
                run.process.send_signal(signal.SIGTERM)
                for stream in short:
                    assert [e async for e in stream][-1].type == "agent_completed"
                for stream in long:
                    last = [e async for e in stream][-1]
                    assert (last.type, last.raw.get("reason")) == ("agent_cancelled", "shutdown")
                for conn in conns:
                    assert (await conn.wait_closed()).code == 1001
            assert await run.wait_exit() == 0
    assert not [pid for pid in run.pids if alive(pid)]
    assert "received SIGTERM: draining 2 workers" in run.text


async def test_global_limits_are_split_across_workers_and_said_so_once(tmp_path):
    """max_runs 2 over 2 workers: each runs 1. A second run on one worker
    waits for that worker's capacity while the other worker runs one."""
    env = keyed_env(NETRA_MAX_RUNS="2", NETRA_MAX_CONNECTIONS="100", NETRA_DRAIN_GRACE_S="0")
    async with supervised("--workers", "2", "--port", "0", cwd=tmp_path, env=env) as run:
        config = Config.load(environ={"NETRA_MAX_RUNS": "2", "NETRA_MAX_CONNECTIONS": "100"})
        assert run.text.count(limits_line(config, 2)) == 1
        assert "max_runs 1" in limits_line(config, 2) and "max_connections 50" in limits_line(config, 2)
        for pid in run.pids:
            found = re.search(rf'"msg": "worker \d \(pid {pid}\): (.*?)"', run.text)
            assert found and found.group(1) == "max_connections 50, max_runs 1, max_queued_runs 2048, max_model_calls 128"
        with trio.fail_after(STEP_S):
            async with AsyncExitStack() as stack:
                first, second = run.pids
                by_pid = await spread(stack, run, run.pids, each=2)
                running = by_pid[first][0].run(HANG)
                assert (await running.__anext__()).type == "agent_started"
                waiting = by_pid[first][1].run(HANG)
                assert (await waiting.__anext__()).type == "run_queued"  # this worker's one run is taken
                elsewhere = by_pid[second][0].run(HANG)
                assert (await elsewhere.__anext__()).type == "agent_started"  # the other worker has its own
        run.process.send_signal(signal.SIGTERM)
        assert await run.wait_exit() == 0


@pytest.mark.parametrize(
    ("args", "extra"), [((), {}), (("--workers", "1"), {}), ((), {"NETRA_WORKERS": "1"})],
    ids=["default", "flag", "environment"],
)
async def test_one_worker_is_one_process_as_before(tmp_path, args, extra):
    async with supervised(*args, "--port", "0", cwd=tmp_path, env=keyed_env(**extra)) as run:
        assert children(run.process.pid) == []
        assert "workers" not in run.text.lower() and "Workers:" not in run.text
        async with httpx.AsyncClient(base_url=run.http_url) as http:
            with trio.fail_after(STEP_S):
                assert (await http.get("/healthz")).status_code == 200
        with socket.socket() as other:  # its port is its own: no SO_REUSEPORT
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as refused:
                other.bind(("127.0.0.1", run.port))
            assert refused.value.errno == errno.EADDRINUSE
        run.process.send_signal(signal.SIGTERM)
        assert await run.wait_exit() == 0


# -- failures ----------------------------------------------------------------------------

CRASHING_AGENTS = """
import os, sys
from netra.agents import builtin_agents

if "--worker" in sys.argv:  # the supervisor loads this too, and must not die of it
    os._exit({status})
agents = builtin_agents()
"""


@pytest.mark.parametrize(("status", "expected"), [(3, 1), (2, 2)])
async def test_workers_that_die_at_once_stop_the_supervisor_with_one_line(tmp_path, status, expected):
    """Status 3: started again once a second, five times, then given up.
    Status 2 (a worker's way of saying a setting is wrong): given up at once."""
    (tmp_path / "crashing.py").write_text(CRASHING_AGENTS.format(status=status))
    args = ("--workers", "2", "--port", "0", "--agents", "crashing:agents")
    async with supervised(*args, cwd=tmp_path, env=keyed_env(), ready=False) as run:
        start = trio.current_time()
        assert await run.wait_exit(timeout=3 * STEP_S) == expected
        took = trio.current_time() - start
    lines = [line for line in run.text.splitlines() if line.startswith("netra: ") and "workers:" not in line]
    assert len(lines) == 1, run.text
    assert f"exited with status {status}" in lines[0]
    assert not re.search(r"^netra \S+ listening on", run.text, re.MULTILINE)  # never announced
    if status == 3:
        assert "5 workers in a row died within 10 s of starting" in lines[0] and "giving up" in lines[0]
        assert took >= 4  # at most one start per second per slot
    else:
        assert "before it listened: a setting to change" in lines[0]
    assert not [pid for pid in children_left(run) if alive(pid)]


def children_left(run: Supervised) -> list[int]:
    """Workers started by ``run`` that may still be around (from its logs)."""
    return [int(p) for p in re.findall(r"\(pid (\d+)\)", run.text)]


async def test_a_killed_supervisor_leaves_no_worker_holding_the_port(tmp_path):
    async with supervised("--workers", "2", "--port", "0", cwd=tmp_path, env=keyed_env()) as run:
        with trio.fail_after(STEP_S):
            async with AsyncExitStack() as stack:
                by_pid = await spread(stack, run, run.pids, each=1)
                run.process.kill()  # no signal forwarded: the workers see their socketpair close
                for held in by_pid.values():
                    assert (await held[0].wait_closed()).code == 1001  # drained, not cut
            while any(alive(pid) for pid in run.pids):
                await trio.sleep(0.05)
    with socket.socket() as again:  # nothing listens on the port any more (what is left is TIME_WAIT)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", run.port))
        again.listen()


async def test_a_busy_port_is_one_line_and_no_worker_starts(tmp_path):
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await netra("serve", "--workers", "3", "--port", str(port), cwd=tmp_path, env=keyed_env())
    assert done.returncode == 2
    assert done.stderr.decode() == f"netra: cannot listen on 127.0.0.1:{port}: address already in use\n"


# -- the parts, without processes ---------------------------------------------------------


def test_the_workers_setting():
    assert Config().workers == "1" and worker_count("1") == 1
    assert worker_count(Config.load(environ={"NETRA_WORKERS": "auto"}).workers) == (os.process_cpu_count() or 1)
    assert Config.load(environ={}, overrides={"workers": 4}).workers == "4"
    for bad in ("0", "-2", "many", "", "1.5"):
        with pytest.raises(ValueError, match="workers: expected a number of processes"):
            Config.load(environ={"NETRA_WORKERS": bad})


def test_the_deployment_guide_shows_the_line_netra_prints():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()
    assert limits_line(Config(), 2) in guide


def test_global_caps_are_split_rounding_up():
    config = Config(max_connections=10, max_runs=5, max_queued_runs=1, max_model_calls=256)
    assert split_limits(config, 3) == {"max_connections": 4, "max_runs": 2, "max_queued_runs": 1, "max_model_calls": 86}
    assert set(split_limits(config, 1)) == set(SPLIT_LIMITS)
    assert split_limits(config, 1) == {name: getattr(config, name) for name in SPLIT_LIMITS}


def test_workers_of_a_cluster_split_only_their_sockets():
    """With Redis the workers are nodes of a cluster: the caps hold whole,
    across all of them, and only each process's own sockets are split."""
    config = Config(max_connections=10, max_runs=5, redis_url="redis://127.0.0.1:6379/0")
    assert split_limits(config, 3) == {"max_connections": 4}
    line = limits_line(config, 3)
    assert "every limit holds across all workers and nodes through Redis" in line
    assert "max_connections 4" in line and "max_runs" not in line


def _listener(port: int, **kwargs) -> Listener:
    async def nothing(*args) -> None:
        pass

    return Listener.bind(
        "127.0.0.1", port, limits=ListenerLimits(max_connections=1, handshake_timeout_s=1.0),
        on_upgrade=nothing, on_http=nothing, **kwargs,
    )


def test_reuse_port_lets_workers_share_a_port_and_a_single_server_keeps_its_own():
    with reserve_port("127.0.0.1", 0) as reserved:  # how the supervisor picks the port
        port = reserved.getsockname()[1]
        first = _listener(port, reuse_port=True)
        try:
            with pytest.raises(OSError) as refused:  # the default, outside a worker: no sharing
                _listener(port)
            assert refused.value.errno == errno.EADDRINUSE
            second = _listener(port, reuse_port=True)  # what a worker's server asks for
            assert first.address == second.address == ("127.0.0.1", port)
            second.sock.close()
        finally:
            first.sock.close()
    with _listener(0, reuse_port=False).sock as single:  # a single server's port is not open to a supervisor
        with pytest.raises(OSError) as busy:
            reserve_port("127.0.0.1", single.getsockname()[1])
        assert busy.value.errno == errno.EADDRINUSE
