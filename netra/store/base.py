"""The store interface: threads, messages, runs and tool calls that last.

Three backends implement it: SQLite (embedded default), PostgreSQL, and
memory (``database_url = "none"``: nothing outlives the process, but the
rules are the same). The SQL ones are synchronous drivers used from worker
threads through ``trio.to_thread``, each operation borrowing a database
connection and returning it in a ``with`` block, never held across an await
that waits on a client. Every failure of the database surfaces as
:class:`netra.errors.StoreError` (translated inside the backend, at the
edge), ownership failures as :class:`netra.errors.NotFound`.

Runs belong to the node (the process, through its store) that began them: a
node that dies leaves them ``running`` with nobody to finish them. The store
closes such runs as failed with :data:`NODE_LOST`
(:meth:`Store.close_orphaned_runs`, done by ``open()`` by default), and a
retry of their client message id then starts a new run (see
:func:`retry_starts_new_run`).
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol, runtime_checkable

import attrs

RunStatus = Literal["running", "completed", "failed", "cancelled"]
#: A tool call's approval: waiting, answered, or dropped with its run.
ApprovalStatus = Literal["pending", "approved", "denied", "cancelled"]

#: ``error_code`` of a run closed because the node running it is gone.
NODE_LOST: Final = "node_lost"

#: Cancellations that happened to a message rather than being its answer:
#: the connection went away, or the server drained. docs/protocol.md tells
#: clients to resend such a message with the same id, so that must work.
RETRYABLE_CANCEL_REASONS: Final = frozenset({"disconnect", "shutdown"})


def retry_starts_new_run(status: str | None, cancel_reason: str | None, error_code: str | None) -> bool:
    """Whether a message whose client id already started a run that is now in
    this state starts a new run (True) or is a duplicate of it (False).

    A run that was cut short from outside (its connection lost or the server
    drained: ``cancelled`` for :data:`RETRYABLE_CANCEL_REASONS`, or its node
    died: ``failed`` with :data:`NODE_LOST`) never answered the message, so
    the retry is answered by a new run and the id moves to it. Everything else
    is the message's answer, or still becoming it (``running``, ``completed``,
    a failure of its own, a cancel the user asked for): the retry is a
    duplicate that points at it. Every backend decides with this function.
    """
    if status == "cancelled":
        return cancel_reason in RETRYABLE_CANCEL_REASONS
    return status == "failed" and error_code == NODE_LOST


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
class ApprovalRecord:
    """A tool call that asked the user first, and what they answered.

    Written when the run starts waiting (``pending``) and again when it
    stops: ``approved`` (``edited_args`` set when the user changed the
    arguments), ``denied`` (``reason`` is the user's, or ``timeout`` when
    nobody answered by ``expires_at``), or ``cancelled`` when the run ended
    while it waited. Times are epoch seconds."""

    run_id: str
    thread_id: str
    tool_call_id: str
    tool: str
    args: dict[str, Any]
    status: ApprovalStatus
    requested_at: float
    expires_at: float
    decided_at: float | None = None
    edited_args: dict[str, Any] | None = None
    reason: str | None = None


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
    #: Calls that asked for approval, in the order they asked.
    approvals: tuple[ApprovalRecord, ...] = ()


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
    #: Set when ``client_id`` was accepted before by a run cut short from
    #: outside (:func:`retry_starts_new_run`): that run. The id now belongs to
    #: this new run; the old run and its messages stay as they ended.
    replaces: str | None = None


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
    #: Group commit: begin_run/finish_run calls written, and the batches that
    #: wrote them (fewer when calls arrived together), each one thread hop and
    #: one transaction (two when a write in it failed).
    writes: int = 0
    write_batches: int = 0


@runtime_checkable
class Store(Protocol):
    #: The node this store writes runs for: one per process (or as given).
    node_id: str

    async def open(self) -> None:
        """Connect, apply pending migrations, and (unless told not to) close
        the runs that dead nodes left running."""

    async def aclose(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError unless the database answers (used by /readyz)."""

    async def begin_run(self, start: RunStart) -> RunStarted:
        """Create the thread if needed, record the user message and the run
        (status ``running``). NotFound if ``thread_id`` is not the user's."""

    async def finish_run(self, outcome: RunOutcome) -> None:
        """Record the answer (possibly partial), tool calls and outcome;
        approvals still pending are closed as ``cancelled``."""

    async def record_approval(self, approval: ApprovalRecord) -> None:
        """Record a pending approval, or the decision on one (by run and
        tool call id): a decision replaces only a pending record. NotFound
        when the run is gone (its thread deleted meanwhile)."""

    async def history(self, thread_id: str, *, limit: int) -> list[StoredMessage]:
        """The thread's last ``limit`` messages, oldest first."""

    async def list_threads(self, user_id: str, *, limit: int = 100) -> list[ThreadRecord]: ...

    async def get_thread(
        self, user_id: str, thread_id: str
    ) -> tuple[ThreadRecord, list[StoredMessage], list[RunRecord]]:
        """NotFound unless the thread exists and is the user's."""

    async def delete_thread(self, user_id: str, thread_id: str) -> None:
        """NotFound unless the thread exists and is the user's."""

    async def close_orphaned_runs(self, node_id: str | None = None) -> int:
        """Close as failed (:data:`NODE_LOST`) the runs left ``running`` by
        ``node_id``, or by default by every node that is no longer alive,
        keeping what they recorded. Returns how many were closed."""

    def stats(self) -> PoolStats: ...
