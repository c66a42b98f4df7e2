"""The embedded store: SQLite through the standard library's ``sqlite3``.

``sqlite3`` blocks, so every operation runs in a worker thread
(``trio.to_thread.run_sync``) and holds a connection only inside that thread:
it is borrowed from a small pool in a ``with`` block and returned before the
thread ends, never across an await. A :class:`trio.CapacityLimiter` sized to
``store_pool_size`` bounds the threads, hence the connections.

The database runs in WAL mode so readers do not wait for the writer; writes
take the write lock up front (``BEGIN IMMEDIATE``) because a read transaction
upgraded later can fail with SQLITE_BUSY without waiting at all.
``busy_timeout`` is ``store_timeout_s``.

Where the file lives: ``sqlite:///relative/path``, ``sqlite:////absolute/path``
(``?mode=ro`` and other URI options are passed on), or, when ``database_url``
is unset, ``data_dir/netra.sqlite3``. ``sqlite:///:memory:`` is a fresh
database in a temporary folder removed by :meth:`SQLiteStore.aclose`: a real
file rather than a shared-cache memory database, because shared cache has
table locks that ignore ``busy_timeout`` and fail under concurrent writers.

Runs are written by group commit (:mod:`netra.store._batch`): SQLite has one
writer at a time anyway, so writes that arrive together share one ``BEGIN
IMMEDIATE`` ... ``COMMIT`` and one thread hop instead of queueing for the
lock one by one. Node liveness locks are files in ``NAME.nodes/`` next to
the database (:mod:`netra.store._nodes`); a read-only store (``?mode=ro``)
takes none and closes no runs.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio

from ..config import Config
from ..errors import NetraError, StoreError
from . import _migrations, _schema
from ._batch import Call, GroupCommit, Result, WriteFailed, write_all, write_each
from ._gate import Gate
from ._nodes import FileClaims
from ._operations import SqlOperations

T = TypeVar("T")

_PREFIX = "sqlite:///"

_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
_UNAVAILABLE = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM")


def _store_error(exc: Exception) -> StoreError:
    """The one place sqlite3 failures become StoreError. The message is short
    and generic (clients see it); the original stays chained for the logs."""
    if isinstance(exc, UnicodeError):  # e.g. a lone surrogate in a text
        return StoreError("the text cannot be stored")
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_BUSY):
        return StoreError("the database is busy")
    if name.startswith(_UNAVAILABLE):
        return StoreError("the database is unavailable")
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreError("the database rejected the write")
    return StoreError("database error")


def database_location(config: Config) -> tuple[str | None, bool]:
    """(file name or URI for sqlite3.connect, is_uri); None means a temporary
    database. Raises ValueError for a URL this backend cannot open."""
    url = config.database_url
    if url is None:
        return str(Path(config.data_dir) / "netra.sqlite3"), False
    if not url.startswith(_PREFIX) or len(url) == len(_PREFIX):
        raise ValueError("an SQLite database_url looks like sqlite:///path/to/file")
    path, _, query = url[len(_PREFIX) :].partition("?")
    if path == ":memory:":
        return None, False
    if query:
        return f"{Path(path).absolute().as_uri()}?{query}", True
    return path, False


def _nodes_folder(database: str, uri: bool) -> Path | None:
    """Where the node locks of this database live; None for a read-only
    database, which begins no runs."""
    if not uri:
        return Path(f"{database}.nodes")
    parts = urlsplit(database)
    if "ro" in parse_qs(parts.query).get("mode", []):
        return None
    return Path(f"{unquote(parts.path)}.nodes")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, write: bool) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        # If even ROLLBACK fails, the connection stays in a transaction and
        # _Connections discards it.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@attrs.define(eq=False)
class _Connections:
    """Idle connections, each borrowed by exactly one worker thread at a time.

    The CapacityLimiter in front bounds how many are out; this only recycles
    them. A connection that saw a database error is closed rather than
    returned, so whatever state the failure left behind (a dead file handle, a
    half-open transaction) does not outlive it.
    """

    database: str
    uri: bool
    timeout_s: float
    _idle: list[sqlite3.Connection] = attrs.field(factory=list, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.database,
            uri=self.uri,
            timeout=self.timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # borrowed by different worker threads over time
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")  # per connection: cascades need it
            self._wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode
        except BaseException:
            conn.close()
            raise
        return conn

    def _wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL (persistent, a no-op once set). The switch does not
        wait on busy_timeout: two servers creating the same file at once see
        SQLITE_BUSY at once, so retry until the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = (getattr(exc, "sqlite_errorname", "") or "").startswith(_BUSY)
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        healthy = False
        try:
            yield conn
            healthy = True
        except NetraError:
            healthy = True  # NotFound and the like: the connection is fine
            raise
        finally:
            keep = healthy and not conn.in_transaction
            with self._lock:
                if keep and not self._closed:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


@attrs.define(eq=False)
class SQLiteStore(SqlOperations):
    """:class:`netra.store.base.Store` on an SQLite file."""

    config: Config
    _conns: _Connections | None = attrs.field(default=None, init=False)
    _gate: Gate | None = attrs.field(default=None, init=False)
    _tempdir: str | None = attrs.field(default=None, init=False)

    @property
    def size(self) -> int:
        return max(1, self.config.store_pool_size)

    def _gate_or_none(self) -> Gate | None:
        return self._gate

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        if self._gate is not None:
            raise RuntimeError("store already open")
        database, uri = database_location(self.config)
        self._gate = gate = Gate(self.size, self.config.store_timeout_s)
        self._commits = GroupCommit(gate, self._work_batch, max_batch=self.max_batch)
        try:
            self._conns, self._tempdir, nodes = await trio.to_thread.run_sync(
                self._prepare, database, uri
            )
            await self._call(_migrations.migrate, write=True)
            claims = None if nodes is None else FileClaims(nodes, self.config.store_timeout_s)
            await self._start_node(claims)
        except BaseException:
            await self.aclose()
            raise

    def _prepare(self, database: str | None, uri: bool) -> tuple[_Connections, str | None, Path | None]:
        """Create the folder (or a temporary one) so a first start just works."""
        tempdir = None
        try:
            if database is None:
                tempdir = tempfile.mkdtemp(prefix="netra-sqlite-")
                database = str(Path(tempdir) / "netra.sqlite3")
            elif not uri:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError("the database folder cannot be created") from exc
        conns = _Connections(database, uri, self.config.store_timeout_s)
        return conns, tempdir, _nodes_folder(database, uri)

    async def aclose(self) -> None:
        """Close idle connections now; borrowed ones close as they come back.
        The node's lock goes too: runs it left running are orphans now."""
        await self._stop_node()
        conns, tempdir = self._conns, self._tempdir
        self._conns = self._gate = self._tempdir = None
        if conns is not None:
            await trio.to_thread.run_sync(conns.close)
        if tempdir is not None:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(tempdir, ignore_errors=True))

    # -- plumbing ---------------------------------------------------------

    async def _call(self, op: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run ``op(db, *args)`` in a worker thread, in one transaction, on a
        borrowed connection. Waiting for a free connection counts against
        ``store_timeout_s``; the thread itself is bounded by ``busy_timeout``
        and is never abandoned (it holds a connection)."""
        gate = self._gate
        if gate is None:
            raise StoreError("the store is not open")
        return await gate.run(self._work, op, args, write)

    def _work(self, op: Callable[..., T], args: tuple[Any, ...], write: bool) -> T:
        conns = self._conns
        if conns is None:
            raise StoreError("the store is not open")
        try:
            with conns.borrow() as conn, _transaction(conn, write):
                return op(_schema.Db(conn, _schema.SQLITE), *args)
        except (sqlite3.Error, UnicodeError) as exc:
            raise _store_error(exc) from exc

    def _work_batch(self, calls: list[Call]) -> list[Result]:
        """A group-commit batch: one write transaction, written plainly, or
        again with a savepoint per write if one of them failed."""
        try:
            return self._work(write_all, (calls,), True)
        except WriteFailed:
            return self._work(write_each, (calls, (sqlite3.Error, UnicodeError), _store_error), True)
