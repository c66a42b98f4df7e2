"""Store backends for tests: SQLite always, and PostgreSQL when one answers:
the server named by NETRA_TEST_DATABASE_URL, or else the local one CI uses,
postgresql://postgres@127.0.0.1:5432/test, found without any setting, so
`make test` runs what CI runs. The session works in a database of its own,
created here and dropped afterwards. When no server answers, PostgreSQL
cases are skipped with the reason, never passed silently."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg
import pytest
import trio
from psycopg import sql

from netra.config import Config

PG_ENV = "NETRA_TEST_DATABASE_URL"
#: Where CI's PostgreSQL answers (see .ci/run); tried when PG_ENV is unset.
PG_LOCAL = "postgresql://postgres@127.0.0.1:5432/test"
POOL = 4


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- backends -----------------------------------------------------------------


@attrs.frozen
class PgDatabase:
    url: str  # the session's own database
    admin_url: str  # the database named by NETRA_TEST_DATABASE_URL
    name: str


def pg_candidate(environ: Mapping[str, str]) -> tuple[str, str]:
    """The PostgreSQL server to test against, and where that choice came from."""
    url = environ.get(PG_ENV)
    if url:
        return url, PG_ENV
    return PG_LOCAL, f"the local default ({PG_ENV} is unset)"


def pg_connect(environ: Mapping[str, str]) -> tuple[psycopg.Connection, str]:
    """An autocommit connection to the candidate server, and its URL; skips
    the test, saying why, when none answers there."""
    url, origin = pg_candidate(environ)
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5), url
    except psycopg.Error as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        pytest.skip(
            f"PostgreSQL not tested: no answer from {redacted(url)} ({origin}): {detail}. "
            f"Start a server there, or set {PG_ENV}=postgresql://user@host:5432/db "
            "(a role allowed to CREATE DATABASE)"
        )


def redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[PgDatabase]:
    admin, base = pg_connect(os.environ)
    name = f"netra_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            url = urlsplit(base)._replace(path=f"/{name}").geturl()
            yield PgDatabase(url=url, admin_url=base, name=name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@attrs.define
class Backend:
    name: str
    url: str
    pg: PgDatabase | None = None

    def config(self, **changes: Any) -> Config:
        values: dict[str, Any] = {
            "database_url": self.url,
            "store_pool_size": POOL,
            "store_timeout_s": 10.0,
        }
        return Config(**(values | changes))

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """Make the database really fail for the store, then heal it."""
        if self.pg is None:
            # Another process holds the write lock: writers wait busy_timeout,
            # then fail. (chmod would not stop root; open files outlive unlink.)
            path = self.url.removeprefix("sqlite:///")
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                other.execute("ROLLBACK")
                other.close()
        else:
            await trio.to_thread.run_sync(_pg_allow, self.pg, False)
            try:
                yield
            finally:
                await trio.to_thread.run_sync(_pg_allow, self.pg, True)


def _pg_allow(pg: PgDatabase, allow: bool) -> None:
    """Refuse (and cut) or allow again every connection to the session database."""
    db = sql.Identifier(pg.name)
    with psycopg.connect(pg.admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                db, sql.Literal(allow)
            )
        )
        if allow:
            return
        query = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()"
        )
        admin.execute(query, (pg.name,))
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (pg.name,)
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "backends survived pg_terminate_backend"
            time.sleep(0.05)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path}/db/netra.sqlite3")
    pg = request.getfixturevalue("pg_database")
    return Backend("postgres", pg.url, pg)


