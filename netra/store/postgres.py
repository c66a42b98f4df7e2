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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg_pool
import trio

from ..config import Config
from ..errors import StoreError
from . import _schema
from ._gate import Gate
from ._operations import SqlOperations

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

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            raise RuntimeError("store already open")
        pool = self._make_pool()
        self._pool = pool
        self._gate = Gate(self.size, self.config.store_timeout_s)
        try:
            await trio.to_thread.run_sync(self._start, pool)
            await self._call(_schema.migrate)
        except BaseException:
            await self.aclose()
            raise

    def _make_pool(self) -> psycopg_pool.ConnectionPool:
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
            with pool.connection(timeout=self.config.store_timeout_s) as conn:
                with conn.transaction():
                    return op(_schema.Db(conn, _schema.POSTGRES), *args)
        except (psycopg.Error, UnicodeError) as exc:
            raise _store_error(exc) from exc
