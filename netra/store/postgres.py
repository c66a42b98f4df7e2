"""The server store: PostgreSQL through psycopg 3's synchronous API.

psycopg's async API needs asyncio and does not run under trio, so, as for
SQLite, every operation runs in a worker thread (``trio.to_thread.run_sync``)
that borrows a connection from a ``psycopg_pool.ConnectionPool`` in a ``with``
block and returns it before the thread ends, never across an await. A
:class:`trio.CapacityLimiter` sized to the pool (``store_pool_size``) bounds the
threads, so a thread never waits for a connection that another of ours holds.

Timeouts: waiting for a connection, connecting, and each statement are all
bounded by ``store_timeout_s``. The pool checks a connection before lending it,
so after a server restart idle connections are replaced instead of failing
one request each.

Runs are written by group commit (:mod:`netra.store._batch`), one batch in
flight at a time: fewer commits, and batches never lock against each other.
A node's liveness lock is a session advisory lock on a connection of its own
(:class:`AdvisoryClaims`); PostgreSQL drops it when that connection's
process dies.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs
import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg_pool
import trio

from ..config import Config
from ..errors import StoreError
from . import _migrations, _schema
from ._batch import Call, GroupCommit, Result, WriteFailed, write_all, write_each
from ._gate import Gate
from ._operations import SqlOperations

#: First key of netra's node locks (the two-int advisory lock space, apart
#: from the migration lock's one-bigint space).
_NODE_LOCKS: Final = 731052

T = TypeVar("T")

_BUSY = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
)


def _store_error(exc: Exception) -> StoreError:
    """The one place psycopg failures become StoreError. Server messages can
    quote SQL and the connection target, so clients get a short generic
    message; the original stays chained for the logs."""
    if isinstance(exc, UnicodeError):  # e.g. a lone surrogate in a text
        return StoreError("the text cannot be stored")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StoreError("the database timed out")
    if isinstance(exc, _BUSY):
        return StoreError("the database is busy")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        # Includes PoolTimeout: no working connection within store_timeout_s.
        return StoreError("the database is unavailable")
    if isinstance(exc, psycopg.IntegrityError | psycopg.DataError):
        return StoreError("the database rejected the write")
    return StoreError("database error")


def _node_key(node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(node_id.encode(), digest_size=4).digest(), "big", signed=True)


@attrs.define(eq=False)
class AdvisoryClaims:
    """Liveness through session advisory locks, held on one autocommit
    connection outside the pool for as long as the store is open.

    If that connection breaks (the server restarted), the lock is gone until
    it is taken again: :meth:`refresh` (run by ``ping``, hence by /readyz)
    reconnects and takes it back, and so does every sweep for dead nodes.
    Two node ids whose keys collide look alive to each other: the safe way
    to be wrong (their runs wait for the next sweep)."""

    url: str
    kwargs: dict[str, Any]
    timeout_s: float
    _conn: psycopg.Connection | None = attrs.field(default=None, init=False)
    _own: str | None = attrs.field(default=None, init=False)

    def claim(self, node_id: str) -> None:
        self._own = node_id
        self.refresh()

    def refresh(self) -> None:
        """(Re)connect and hold our own lock, if the connection was lost."""
        if self._own is None:
            return
        conn = self._conn
        try:
            if conn is not None and not conn.closed:
                conn.execute("SELECT 1")
                return
        except psycopg.Error:
            pass
        self._drop()
        try:
            conn = psycopg.connect(self.url, autocommit=True, **self.kwargs)
        except psycopg.Error as exc:
            raise _store_error(exc) from exc
        self._conn = conn
        try:
            deadline = time.monotonic() + self.timeout_s
            while not self._try_lock(self._own):
                if time.monotonic() > deadline:  # only with a node id given twice
                    raise StoreError("another live process holds this node id")
                time.sleep(0.05)
        except psycopg.Error as exc:
            self._drop()
            raise _store_error(exc) from exc

    def _try_lock(self, node_id: str) -> bool:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (_NODE_LOCKS, _node_key(node_id))
        ).fetchone()
        return bool(row and row[0])

    def take_dead(self, nodes: list[str | None]) -> list[str | None]:
        self.refresh()
        own_key = None if self._own is None else _node_key(self._own)
        dead: list[str | None] = []
        try:
            for node in nodes:
                if node is None or (_node_key(node) != own_key and self._try_lock(node)):
                    dead.append(node)
        except psycopg.Error as exc:
            raise _store_error(exc) from exc
        return dead

    def let_go(self, nodes: list[str | None]) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            for node in nodes:
                if node is not None:
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_NODE_LOCKS, _node_key(node)))
        except psycopg.Error:
            self._drop()  # a new connection holds none of them anyway

    def close(self) -> None:
        self._own = None
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass


@attrs.define(eq=False)
class PostgresStore(SqlOperations):
    """:class:`netra.store.base.Store` on PostgreSQL (``database_url`` is any
    libpq URL, ``postgresql://`` or ``postgres://``)."""

    config: Config
    _pool: psycopg_pool.ConnectionPool | None = attrs.field(default=None, init=False)
    _gate: Gate | None = attrs.field(default=None, init=False)

    @property
    def size(self) -> int:
        return max(1, self.config.store_pool_size)

    def _gate_or_none(self) -> Gate | None:
        return self._gate

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            raise RuntimeError("store already open")
        url, kwargs = self._connect_args()
        pool = self._make_pool(url, kwargs)
        self._pool = pool
        self._gate = gate = Gate(self.size, self.config.store_timeout_s)
        self._commits = GroupCommit(gate, self._work_batch, max_batch=self.max_batch)
        try:
            await trio.to_thread.run_sync(self._start, pool)
            await self._call(_migrations.migrate)
            await self._start_node(AdvisoryClaims(url, kwargs, self.config.store_timeout_s))
        except BaseException:
            await self.aclose()
            raise

    def _connect_args(self) -> tuple[str, dict[str, Any]]:
        url = self.config.database_url or ""
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError("database_url is not a valid PostgreSQL URL") from exc
        # Defaults only: whatever the URL says wins.
        kwargs: dict[str, Any] = {}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(2, math.ceil(self.config.store_timeout_s))
        if "application_name" not in params:
            kwargs["application_name"] = "netra"
        return url, kwargs

    def _make_pool(self, url: str, kwargs: dict[str, Any]) -> psycopg_pool.ConnectionPool:
        return psycopg_pool.ConnectionPool(
            url,
            open=False,  # opened in a worker thread by open(): it blocks
            min_size=min(2, self.size),
            max_size=self.size,
            kwargs=kwargs,
            configure=self._configure,
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=self.config.store_timeout_s,
            name="netra-store",
        )

    def _configure(self, conn: psycopg.Connection) -> None:
        """A statement that runs longer than store_timeout_s is cancelled by the
        server: a thread must not stay stuck holding a connection."""
        ms = str(max(1, int(self.config.store_timeout_s * 1000)))
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (ms,))
        conn.commit()  # the pool wants configured connections idle

    def _start(self, pool: psycopg_pool.ConnectionPool) -> None:
        try:
            pool.open(wait=True, timeout=self.config.store_timeout_s)
        except psycopg.Error as exc:
            raise _store_error(exc) from exc

    async def aclose(self) -> None:
        await self._stop_node()
        pool = self._pool
        self._pool = self._gate = None
        if pool is not None:
            await trio.to_thread.run_sync(lambda: pool.close(timeout=5.0))

    # -- plumbing ---------------------------------------------------------

    async def _call(self, op: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run ``op(db, *args)`` in a worker thread, in one transaction, on a
        borrowed connection. Waiting for our turn counts against
        ``store_timeout_s``; the thread itself is bounded by the pool timeout
        and statement_timeout, and is never abandoned (it holds a connection)."""
        gate = self._gate
        if gate is None:
            raise StoreError("the store is not open")
        return await gate.run(self._work, op, args)

    def _work(self, op: Callable[..., T], args: tuple[Any, ...]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        try:
            # READ COMMITTED is enough: begin_run's duplicate check rests on a
            # unique constraint, not on what a snapshot happened to see.
            with pool.connection(timeout=self.config.store_timeout_s) as conn, conn.transaction():
                return op(_schema.Db(conn, _schema.POSTGRES), *args)
        except (psycopg.Error, UnicodeError) as exc:
            raise _store_error(exc) from exc

    def _work_batch(self, calls: list[Call]) -> list[Result]:
        """A group-commit batch: one transaction, written plainly, or again
        with a savepoint per write if one of them failed."""
        try:
            return self._work(write_all, (calls,))
        except WriteFailed:
            return self._work(write_each, (calls, (psycopg.Error, UnicodeError), _store_error))

    async def ping(self) -> None:
        await super().ping()
        claims = self._claims
        if isinstance(claims, AdvisoryClaims):  # take our node's lock back if it was lost
            await trio.to_thread.run_sync(claims.refresh)
