"""The schema: numbered steps, each applied exactly once, in order.

A database records its version in ``schema_version``; :func:`migrate` (run
by every backend's ``open()``, in one write transaction) applies the steps
it has not seen yet, so a database written by an earlier netra is upgraded
in place, and refuses a database written by a later one.
"""

from __future__ import annotations

import time
from typing import Final

from ..errors import StoreError
from ._schema import Db, Dialect

#: (version, SQL) steps, applied in order, each exactly once, never edited
#: after release: a change to the schema is a new step. ``{json_type}`` and
#: ``{serial_pk}`` come from the dialect. Statements are split on ";".
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE threads (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            title TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX threads_user_updated ON threads (user_id, updated_at);

        CREATE TABLE messages (
            seq {serial_pk},
            id TEXT NOT NULL UNIQUE,
            thread_id TEXT NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            text TEXT NOT NULL,
            run_id TEXT,
            client_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (thread_id, client_id)
        );
        CREATE INDEX messages_thread_created ON messages (thread_id, created_at, seq);

        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            thread_id TEXT NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
            user_id TEXT NOT NULL,
            agent TEXT NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
            started_at DOUBLE PRECISION NOT NULL,
            ended_at DOUBLE PRECISION,
            duration_ms BIGINT,
            usage {json_type} NOT NULL,
            error_code TEXT,
            cancel_reason TEXT
        );
        CREATE INDEX runs_thread ON runs (thread_id, started_at);

        CREATE TABLE tool_calls (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            ordinal INTEGER NOT NULL,
            id TEXT NOT NULL,
            name TEXT NOT NULL,
            args {json_type} NOT NULL,
            result {json_type},
            error TEXT,
            duration_ms BIGINT NOT NULL,
            PRIMARY KEY (run_id, ordinal)
        )
        """,
    ),
    (
        2,
        # A message that starts a thread is idempotent too: its client id is
        # unique among the threads its user started (NULLs never conflict).
        """
        ALTER TABLE threads ADD COLUMN client_id TEXT;
        CREATE UNIQUE INDEX threads_user_client ON threads (user_id, client_id)
        """,
    ),
    (
        3,
        # The node (process) that runs each run, so the runs a dead node left
        # running can be found and closed; the partial index holds only the
        # running ones, so finding them never scans the history.
        """
        ALTER TABLE runs ADD COLUMN node_id TEXT;
        CREATE INDEX runs_running_node ON runs (node_id) WHERE status = 'running'
        """,
    ),
    (
        4,
        # Tool calls that asked the user first: the request while it waits,
        # then the decision. One row per call of a run, updated in place.
        """
        CREATE TABLE approvals (
            seq {serial_pk},
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            tool_call_id TEXT NOT NULL,
            tool TEXT NOT NULL,
            args {json_type} NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('pending', 'approved', 'denied', 'cancelled')),
            requested_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            decided_at DOUBLE PRECISION,
            edited_args {json_type},
            reason TEXT,
            UNIQUE (run_id, tool_call_id)
        )
        """,
    ),
)


def statements(sql: str, dialect: Dialect) -> list[str]:
    """One migration step as single statements, for drivers that run one at a time."""
    text = sql.format(json_type=dialect.json_type, serial_pk=dialect.serial_pk)
    return [s.strip() for s in text.split(";") if s.strip()]


def migrate(db: Db) -> int:
    """Apply the pending steps in the caller's (write) transaction, so a failed
    step leaves the database at the previous version. Returns the version."""
    if db.dialect.migration_lock:
        db.run(db.dialect.migration_lock)
    db.run(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    current = db.one("SELECT MAX(version) FROM schema_version")[0] or 0
    latest = MIGRATIONS[-1][0]
    if current > latest:
        # An older netra must not write into tables it does not understand.
        raise StoreError("the database schema is newer than this netra")
    for version, sql in MIGRATIONS:
        if version > current:
            for statement in statements(sql, db.dialect):
                db.run(statement)
            db.run(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                version,
                time.time(),
            )
    return latest
