"""Persistence of threads, messages, runs and tool calls.

:func:`open_store` picks the backend from ``config.database_url``; the caller
owns the lifecycle (``await store.open()`` ... ``await store.aclose()``).
"""

from __future__ import annotations

from ..config import Config
from .base import NODE_LOST as NODE_LOST
from .base import ApprovalRecord as ApprovalRecord
from .base import RETRYABLE_CANCEL_REASONS as RETRYABLE_CANCEL_REASONS
from .base import PoolStats as PoolStats
from .base import RunOutcome as RunOutcome
from .base import RunRecord as RunRecord
from .base import RunStart as RunStart
from .base import RunStarted as RunStarted
from .base import RunStatus as RunStatus
from .base import Store as Store
from .base import StoredMessage as StoredMessage
from .base import ThreadRecord as ThreadRecord
from .base import ToolCallRecord as ToolCallRecord
from .base import retry_starts_new_run as retry_starts_new_run
from .memory import MemoryStore as MemoryStore
from .postgres import PostgresStore as PostgresStore
from .sqlite import SQLiteStore as SQLiteStore
from .sqlite import database_location as _sqlite_location


def open_store(config: Config) -> Store:
    """The store ``config.database_url`` asks for, not yet opened.

    Unset: SQLite in ``data_dir``; ``sqlite:///...``: SQLite;
    ``postgresql://`` or ``postgres://``: PostgreSQL; ``none``: nothing
    kept beyond the process, a :class:`MemoryStore` (same rules, bounded).
    Anything else is a configuration mistake and raises ValueError (naming
    only the scheme: the URL may hold a password).
    """
    url = config.database_url
    if url is None:
        return SQLiteStore(config)
    if url.strip().lower() == "none":
        return MemoryStore()
    if url.startswith("sqlite:"):
        _sqlite_location(config)  # a malformed URL fails now, not at open()
        return SQLiteStore(config)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(config)
    scheme = url.partition(":")[0]
    raise ValueError(
        f"database_url: unsupported scheme {scheme!r}; "
        "use sqlite:///path, postgresql://..., or none"
    )
