"""The store interface: threads, messages, runs and tool calls that last.

Two backends implement it: SQLite (embedded default) and PostgreSQL. Both are
synchronous drivers used from worker threads through ``trio.to_thread``, each
operation borrowing a database connection and returning it in a ``with``
block, never held across an await that waits on a client. Every failure of
the database surfaces as :class:`netra.errors.StoreError` (translated inside
the backend, at the edge), ownership failures as :class:`netra.errors.NotFound`.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import attrs

RunStatus = Literal["running", "completed", "failed", "cancelled"]


@attrs.frozen(kw_only=True)
class StoredMessage:
    id: str
    thread_id: str
    role: Literal["user", "assistant"]
    text: str
    run_id: str | None
    client_id: str | None
    created_at: float  # epoch seconds


@attrs.frozen(kw_only=True)
class ToolCallRecord:
    id: str
    run_id: str
    name: str
    args: dict[str, Any]
    result: Any = None
    error: str | None = None
    duration_ms: int = 0


@attrs.frozen(kw_only=True)
class RunRecord:
    id: str
    thread_id: str
    user_id: str
    agent: str
    status: RunStatus
    started_at: float
    ended_at: float | None = None
    duration_ms: int | None = None
    usage: dict[str, int] = attrs.field(factory=dict)
    error_code: str | None = None
    cancel_reason: str | None = None
    tool_calls: tuple[ToolCallRecord, ...] = ()


@attrs.frozen(kw_only=True)
class ThreadRecord:
    id: str
    user_id: str
    title: str
    created_at: float
    updated_at: float


@attrs.frozen(kw_only=True)
class RunStart:
    """Everything recorded, in one transaction, before a run starts."""

    run_id: str
    thread_id: str | None  # None: create a new thread with ``new_thread_id``
    new_thread_id: str
    user_id: str
    agent: str
    text: str
    user_message_id: str
    client_id: str | None
    started_at: float


@attrs.frozen(kw_only=True)
class RunStarted:
    thread: ThreadRecord
    #: Set when ``client_id`` was already accepted on this thread: the run it
    #: started. Nothing was written and no new run may start.
    duplicate_of: str | None = None


@attrs.frozen(kw_only=True)
class RunOutcome:
    """Everything recorded, in one transaction, when a run ends."""

    run_id: str
    thread_id: str
    status: RunStatus
    ended_at: float
    duration_ms: int
    answer_message_id: str
    answer_text: str  # the whole answer, or the partial one of a failed/cancelled run
    usage: dict[str, int]
    error_code: str | None = None
    cancel_reason: str | None = None
    tool_calls: tuple[ToolCallRecord, ...] = ()


@attrs.frozen(kw_only=True)
class PoolStats:
    size: int
    in_use: int
    waiting: int
    waits_total: int


@runtime_checkable
class Store(Protocol):
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def aclose(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError unless the database answers (used by /readyz)."""

    async def begin_run(self, start: RunStart) -> RunStarted:
        """Create the thread if needed, record the user message and the run
        (status ``running``). NotFound if ``thread_id`` is not the user's."""

    async def finish_run(self, outcome: RunOutcome) -> None:
        """Record the answer (possibly partial), tool calls and outcome."""

    async def history(self, thread_id: str, *, limit: int) -> list[StoredMessage]:
        """The thread's last ``limit`` messages, oldest first."""

    async def list_threads(self, user_id: str, *, limit: int = 100) -> list[ThreadRecord]: ...

    async def get_thread(
        self, user_id: str, thread_id: str
    ) -> tuple[ThreadRecord, list[StoredMessage], list[RunRecord]]:
        """NotFound unless the thread exists and is the user's."""

    async def delete_thread(self, user_id: str, thread_id: str) -> None:
        """NotFound unless the thread exists and is the user's."""

    def stats(self) -> PoolStats: ...
