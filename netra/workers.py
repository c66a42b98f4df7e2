"""``netra serve --workers N``: N server processes on one port, one machine.

A parent process, the supervisor, listens on nothing. It starts N workers;
each is today's whole server (its own Hub, sessions, limiters, store
connections) listening on the same port with SO_REUSEPORT, and the kernel
spreads new connections among them. A connection lives and dies in the
worker that accepted it, so nothing about one connection is shared.

Workers are subprocesses running ``python -m netra serve``, not
multiprocessing children. A worker then is exactly the server an operator
starts by hand: the same settings from the same flags, environment and file,
the same one-line errors, the same drain, the same exit status; it writes its
logs straight to the inherited stderr; nothing (a Hub holds locks, limiters,
user-loaded agent modules) has to be pickled; and ``trio.lowlevel.open_process``
gives the supervisor processes it can await and signal from trio, which
multiprocessing (blocking pipes, its own reaping) does not.

The supervisor and its workers talk over one socketpair per worker: the
worker writes ``ready`` once it listens; the supervisor only keeps its end
open. When the supervisor dies without forwarding a signal (kill -9), its
end closes and each worker sees end-of-file and drains, so no worker keeps
the port with nobody left to restart it.

What the supervisor does:

- It binds, without listening, a socket to the port, with the options the
  workers' sockets have: this picks the port when it is 0, so that every
  worker shares that one, and a port another process listens on fails at
  once, in one line. Only listening sockets get connections; this one gets
  none.
- Without a cluster, global caps (:data:`SPLIT_LIMITS`) are split: each
  worker gets ``ceil(limit / N)``. Per-user limits cannot be enforced across
  processes without a shared store of counts, so they hold per worker;
  :func:`limits_line` says so at start-up. With ``redis_url`` the workers
  are nodes of a cluster: every limit but ``max_connections`` (a process's
  own sockets, still split) holds across all of them through Redis.
- A worker that dies is started again, at most once per
  :data:`RESTART_INTERVAL_S` per slot; :data:`MAX_QUICK_DEATHS` deaths in a
  row of workers that had not served :data:`SETTLED_S` stop everything with
  one line and exit status 1 (2 when a worker said a setting is wrong).
- SIGTERM and SIGINT both mean drain: every worker gets SIGTERM and drains
  as a single server does; the supervisor exits 0 once all have exited 0.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping

import attrs
import trio

from .config import Config
from .hub import Hub
from .server import Server, serve_forever

log = logging.getLogger("netra.workers")

#: A slot starts a worker at most this often, so a crash loop does not spin.
RESTART_INTERVAL_S = 1.0
#: A worker that dies before it has listened this long died at once ...
SETTLED_S = 10.0
#: ... and this many such deaths in a row, in one slot, stop the supervisor.
MAX_QUICK_DEATHS = 5
#: Time a started worker has to listen before it is killed (and counted as a quick death).
START_TIMEOUT_S = 60.0
#: What a worker writes to its supervisor once it listens.
READY = b"ready\n"
#: Set in every worker's environment; :meth:`netra.transport.Listener.bind` reads it.
#: Caps of the whole server: each worker gets ceil(limit / N).
SPLIT_LIMITS = ("max_connections", "max_runs", "max_queued_runs", "max_model_calls")
#: Caps per user: held per worker only, for want of a shared store of counts.
PER_USER_LIMITS = ("max_connections_per_user", "max_runs_per_user", "max_queued_runs_per_user")


def worker_count(setting: str) -> int:
    """The number of workers the ``workers`` setting asks for (``auto``: one
    per core this process may run on)."""
    if setting == "auto":
        return os.process_cpu_count() or 1
    return int(setting)


def split_limits(config: Config, workers: int) -> dict[str, int]:
    """Each worker's share of the global caps: ceil(limit / workers). In a
    cluster only the sockets are split; Redis holds the rest whole."""
    names = ("max_connections",) if config.redis_url else SPLIT_LIMITS
    return {name: math.ceil(getattr(config, name) / workers) for name in names}


def limits_line(config: Config, workers: int) -> str:
    """The one line ``netra serve --workers N`` prints about limits at start-up."""
    shares = ", ".join(f"{name} {share}" for name, share in split_limits(config, workers).items())
    if config.redis_url:
        return (
            f"netra: {workers} workers in a cluster (redis_url): every limit holds across all workers and "
            f"nodes through Redis; each worker holds at most ceil(max_connections / {workers}) sockets ({shares})"
        )
    return (
        f"netra: {workers} workers: max_connections and max_runs are split across the workers, each gets "
        f"ceil(limit / {workers}) ({shares}); per-user limits ({', '.join(PER_USER_LIMITS)}) hold per "
        "worker only; set redis_url to hold them across workers (docs/cluster.md)"
    )


def worker_environment(environ: Mapping[str, str], config: Config, workers: int) -> dict[str, str]:
    """A worker's environment: the supervisor's, and its share of the global
    caps (the environment outranks a settings file, and these have no flag)."""
    env = dict(environ)
    env.update({f"NETRA_{name.upper()}": str(share) for name, share in split_limits(config, workers).items()})
    return env


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that never listens, with the options
    of the workers' sockets (as :func:`socket.create_server` sets them, plus
    SO_REUSEPORT), so they can join it. Raises OSError as ``bind`` does:
    EADDRINUSE when another process listens there without SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


# -- the worker side -------------------------------------------------------------


async def serve_as_worker(
    hub: Hub, supervisor: socket.socket, *, on_ready: Callable[[Server], None] | None = None
) -> None:
    """:func:`netra.server.serve_forever`, telling the supervisor once the
    server listens, and draining when the supervisor is gone."""
    supervisor.setblocking(False)
    async with trio.open_nursery() as nursery:

        def ready(server: Server) -> None:
            if on_ready is not None:
                on_ready(server)
            try:
                supervisor.send(READY)  # a few bytes into an empty socket buffer: never blocks
            except OSError:
                pass  # the supervisor is gone already: the watch below sees it
            nursery.start_soon(_drain_when_orphaned, supervisor, server)

        await serve_forever(hub, on_ready=ready, reuse_port=True)  # the port is the workers' to share
        nursery.cancel_scope.cancel()


async def _drain_when_orphaned(supervisor: socket.socket, server: Server) -> None:
    while True:
        await trio.lowlevel.wait_readable(supervisor)
        try:
            if supervisor.recv(64):
                continue  # the supervisor sends nothing today; ignore what a later one might
        except BlockingIOError:
            continue
        except OSError:
            pass
        log.warning("the supervisor is gone: draining")
        server.request_stop()
        return


# -- the supervisor --------------------------------------------------------------


@attrs.define(eq=False)
class Slot:
    """One of the N places a worker runs in, and the worker in it now."""

    number: int
    process: trio.Process | None = None
    started_at: float = -math.inf
    ready_at: float | None = None
    quick_deaths: int = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)


@attrs.define(eq=False, kw_only=True)
class Supervisor:
    """Keeps ``count`` workers running until SIGTERM or SIGINT, then drains them.

    ``command(slot, fd)`` is a worker's argv, given the number of its slot
    and the file descriptor of its end of the socketpair; ``on_ready`` is
    called with every worker's pid once all of them listen, the first time.
    """

    count: int
    command: Callable[[int, int], list[str]]
    env: Mapping[str, str]
    #: How long workers may take to drain before they are killed.
    stop_timeout_s: float
    on_ready: Callable[[list[int]], None] = lambda pids: None
    #: The exit status: 0, or why the supervisor failed.
    status: int = 0
    slots: list[Slot] = attrs.field(init=False)
    _stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    _announced: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.slots = [Slot(number) for number in range(1, self.count + 1)]

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signal, signals)
                nursery.start_soon(self._kill_stragglers)
                async with trio.open_nursery() as slots:
                    for slot in self.slots:
                        slots.start_soon(self._keep, slot)
                nursery.cancel_scope.cancel()
        return self.status

    def stop(self) -> None:
        """Drain: SIGTERM to every worker, and start none any more."""
        if not self._stopping.is_set():
            self._stopping.set()
            for slot in self.slots:
                slot.signal(signal.SIGTERM)

    def _fail(self, status: int, line: str) -> None:
        print(f"netra: {line}", file=sys.stderr, flush=True)
        self.status = self.status or status
        self.stop()

    async def _stop_on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("received %s: draining %d workers", signal.Signals(signum).name, self.count)
            self.stop()

    async def _kill_stragglers(self) -> None:
        await self._stopping.wait()
        await trio.sleep(self.stop_timeout_s)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error("worker %d (pid %d) still runs %g s after the stop: killing it",
                          slot.number, slot.pid, self.stop_timeout_s)
                slot.process.kill()

    async def _keep(self, slot: Slot) -> None:
        """Run a worker in ``slot`` until the stop, starting another when one dies."""
        while True:
            with trio.move_on_at(slot.started_at + RESTART_INTERVAL_S):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            status = await self._run_once(slot)
            served = slot.ready_at is not None
            if status is None:
                status, what = 1, f"worker {slot.number} could not be started"
            else:
                what = f"worker {slot.number} (pid {slot.pid}) {describe_exit(status)}"
            if self._stopping.is_set():
                # one that never listened may die of the SIGTERM before it could drain: nothing to drain
                if served and status != 0:
                    self._fail(1, f"{what} while draining")
                return
            if not served and status == 2:
                self._fail(2, f"{what} before it listened: a setting to change (see its line above)")
                return
            quick = not served or trio.current_time() - slot.ready_at < SETTLED_S  # type: ignore[operator]
            slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
            if slot.quick_deaths >= MAX_QUICK_DEATHS:
                self._fail(1, f"{what}; {MAX_QUICK_DEATHS} workers in a row died within {SETTLED_S:g} s of "
                              f"starting in slot {slot.number}: giving up, stopping every worker")
                return
            log.warning("%s: starting another", what)

    async def _run_once(self, slot: Slot) -> int | None:
        """Start a worker in ``slot``; its exit status once it has exited
        (None: it could not be started)."""
        ours, theirs = socket.socketpair()
        with ours:
            with theirs:
                slot.started_at, slot.ready_at, slot.process = trio.current_time(), None, None
                try:
                    process = await trio.lowlevel.open_process(
                        self.command(slot.number, theirs.fileno()),
                        env=self.env,
                        pass_fds=(theirs.fileno(),),
                        stdin=subprocess.DEVNULL,
                        # its own process group: a Ctrl-C in the terminal reaches the
                        # supervisor only, which turns it into one SIGTERM per worker
                        process_group=0,
                    )
                except OSError as exc:
                    log.error("cannot start worker %d: %s", slot.number, exc)
                    return None
            slot.process = process
            if self._stopping.is_set():
                process.send_signal(signal.SIGTERM)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, slot, ours)
                status = await process.wait()
                nursery.cancel_scope.cancel()
        return status

    async def _await_ready(self, slot: Slot, channel: socket.socket) -> None:
        channel.setblocking(False)
        received = b""
        with trio.move_on_after(START_TIMEOUT_S):
            while READY not in received:
                await trio.lowlevel.wait_readable(channel)
                try:
                    chunk = channel.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return  # it exited before it listened: _keep hears of it from wait()
                received += chunk
            slot.ready_at = trio.current_time()
            self._worker_ready(slot)
            return
        log.error("worker %d (pid %d) did not listen within %g s: killing it", slot.number, slot.pid, START_TIMEOUT_S)
        assert slot.process is not None
        slot.process.kill()

    def _worker_ready(self, slot: Slot) -> None:
        if self._announced:
            log.warning("worker %d started again: pid %d", slot.number, slot.pid)
        elif all(s.ready_at is not None for s in self.slots):
            self._announced = True
            self.on_ready([s.pid for s in self.slots])  # type: ignore[misc]
