"""The store of a server that keeps nothing: ``database_url = "none"``.

The same rules as the SQL stores (threads belong to their user, NotFound for
anyone else's, history, client message ids decided exactly as
:func:`netra.store._schema.begin_run` decides them, outcomes recorded once),
so the rest of netra has one code path whether or not a database is
configured. Nothing outlives the process.

This is the hot path of a server run without a database, so every operation
is plain dictionary work in the caller's task: no thread, no checkpoint, O(1)
apart from reads that return a whole thread or a user's list. Its memory is
bounded for a server that runs for months: at most ``max_threads`` threads
and ``max_text_chars`` characters of text (messages, tool arguments and
results), the least recently used thread forgotten whole (messages, runs,
client ids) while either is exceeded; and at most ``max_runs_per_thread``
runs in one thread, the oldest quarter forgotten at once when it is
exceeded (so the cost is O(1) per run, amortized). A forgotten message id is
a new message again: the memory store is idempotent for as long as it
remembers.
"""

from __future__ import annotations

import bisect
import heapq
import json
from json.encoder import encode_basestring_ascii as _json_string
from collections import OrderedDict
from typing import Any

import attrs

from ..errors import NotFound, StoreError
from ._nodes import new_node_id
from ._schema import _title
from .base import (
    ApprovalRecord,
    PoolStats,
    RunOutcome,
    RunRecord,
    RunStart,
    RunStarted,
    RunStatus,
    StoredMessage,
    ThreadRecord,
    ToolCallRecord,
    retry_starts_new_run,
)

#: A message in its thread's order: (created_at, seq, message), as the SQL
#: stores order them (``ORDER BY created_at, seq``).
_Entry = tuple[float, int, StoredMessage]


def _as_json(value: Any) -> tuple[Any, int]:
    """What a SQL store gives back for a tool's args or result: JSON values
    only (odd objects as strings), never the caller's own mutable object;
    and its size in characters."""
    # The usual shapes (a number, a string, an object of strings: a tool's
    # arguments) without a round trip through text: the same value and size.
    kind = type(value)
    if kind is int:
        return value, len(int.__repr__(value))
    if kind is str:
        return value, len(_json_string(value))
    if kind is dict and len(value) <= 8:
        size = 2 * len(value)  # the braces, and ", " between the items
        for key, item in value.items():
            if type(key) is not str or type(item) is not str:
                break
            size += len(_json_string(key)) + len(_json_string(item)) + 2  # and ": "
        else:
            return dict(value), size if value else 2
    text = json.dumps(value, default=str)
    return json.loads(text), len(text)


# Threads and runs are kept as plain mutable objects and turned into the
# frozen records only when read: a frozen record rebuilt on every write (with
# attrs.evolve) was most of what a run cost here.


@attrs.define(eq=False, slots=True)
class _Run:
    id: str
    thread_id: str
    user_id: str
    agent: str
    started_at: float
    status: RunStatus = "running"
    ended_at: float | None = None
    duration_ms: int | None = None
    usage: dict[str, int] = attrs.field(factory=dict)
    error_code: str | None = None
    cancel_reason: str | None = None
    tool_calls: tuple[ToolCallRecord, ...] = ()
    #: By tool call id, in the order they were asked (made on the first one).
    approvals: dict[str, ApprovalRecord] | None = None

    def record(self) -> RunRecord:
        return RunRecord(
            id=self.id, thread_id=self.thread_id, user_id=self.user_id, agent=self.agent,
            status=self.status, started_at=self.started_at, ended_at=self.ended_at,
            duration_ms=self.duration_ms, usage=dict(self.usage), error_code=self.error_code,
            cancel_reason=self.cancel_reason, tool_calls=self.tool_calls,
            approvals=tuple(self.approvals.values()) if self.approvals else (),
        )  # fmt: skip


@attrs.define(eq=False, slots=True)
class _Thread:
    id: str
    user_id: str
    title: str
    created_at: float
    updated_at: float
    #: The id of the message that started it (scope: its user's threads).
    client_id: str | None
    messages: list[_Entry] = attrs.field(factory=list)
    #: Client id -> the message holding it (scope: this thread).
    ids: dict[str, _Entry] = attrs.field(factory=dict)
    #: Runs in the order they began.
    runs: dict[str, _Run] = attrs.field(factory=dict)
    #: Characters of text each run holds (its messages and tool calls).
    sizes: dict[str, int] = attrs.field(factory=dict)
    chars: int = 0

    def record(self) -> ThreadRecord:
        return ThreadRecord(
            id=self.id, user_id=self.user_id, title=self.title,
            created_at=self.created_at, updated_at=self.updated_at,
        )  # fmt: skip


@attrs.define(eq=False)
class MemoryStore:
    """:class:`netra.store.base.Store` in this process's memory."""

    max_threads: int = attrs.field(default=50_000, kw_only=True)
    max_runs_per_thread: int = attrs.field(default=1_000, kw_only=True)
    max_text_chars: int = attrs.field(default=64_000_000, kw_only=True)
    node_id: str = attrs.field(factory=new_node_id, kw_only=True)
    #: Least recently used first.
    _threads: OrderedDict[str, _Thread] = attrs.field(factory=OrderedDict, init=False, repr=False)
    #: User -> their thread ids (an ordered set), for list_threads.
    _by_user: dict[str, dict[str, None]] = attrs.field(factory=dict, init=False, repr=False)
    #: (user, client id) -> the thread that message started.
    _started: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False, repr=False)
    _seq: int = attrs.field(default=0, init=False)
    _chars: int = attrs.field(default=0, init=False)
    _open: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if min(self.max_threads, self.max_runs_per_thread, self.max_text_chars) < 1:
            raise ValueError("max_threads, max_runs_per_thread and max_text_chars must be at least 1")

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            raise RuntimeError("store already open")
        self._open = True

    async def aclose(self) -> None:
        self._open = False
        self._threads.clear()
        self._by_user.clear()
        self._started.clear()
        self._chars = 0

    async def ping(self) -> None:
        self._check_open()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the store is not open")

    def stats(self) -> PoolStats:
        return PoolStats(size=0, in_use=0, waiting=0, waits_total=0)

    def __len__(self) -> int:
        """Threads remembered now."""
        return len(self._threads)

    @property
    def text_chars(self) -> int:
        """Characters of text remembered now."""
        return self._chars

    # -- runs --------------------------------------------------------------

    async def begin_run(self, start: RunStart) -> RunStarted:
        self._check_open()
        replaces: str | None = None
        cid = start.client_id
        if start.thread_id is None:
            if cid is not None and (earlier_id := self._started.get((start.user_id, cid))) is not None:
                earlier = self._threads[earlier_id]
                entry = earlier.ids.get(cid)
                if entry is not None:  # (None: that message was forgotten, and its id with it)
                    run_id = entry[2].run_id
                    if not self._retry_starts_new_run(earlier, run_id):
                        self._threads.move_to_end(earlier_id)
                        return RunStarted(thread=earlier.record(), duplicate_of=run_id)
                    self._release(earlier, entry)
                    replaces = run_id
                earlier.client_id = None
                del self._started[(start.user_id, cid)]
            if start.new_thread_id in self._threads:
                raise StoreError("the database rejected the write")
            thread = self._new_thread(start)
        else:
            thread = self._owned(start.user_id, start.thread_id)
            if cid is not None and (entry := thread.ids.get(cid)) is not None:
                run_id = entry[2].run_id
                if not self._retry_starts_new_run(thread, run_id):
                    self._threads.move_to_end(thread.id)
                    return RunStarted(thread=thread.record(), duplicate_of=run_id)
                self._release(thread, entry)
                replaces = run_id
            thread.updated_at = start.started_at
            self._threads.move_to_end(thread.id)
        message = StoredMessage(
            id=start.user_message_id, thread_id=thread.id, role="user", text=start.text,
            run_id=start.run_id, client_id=cid, created_at=start.started_at,
        )  # fmt: skip
        entry = self._add(thread, message)
        if cid is not None:
            thread.ids[cid] = entry
        thread.runs[start.run_id] = _Run(
            id=start.run_id, thread_id=thread.id, user_id=start.user_id, agent=start.agent,
            started_at=start.started_at,
        )  # fmt: skip
        self._charge(thread, start.run_id, len(start.text))
        if len(thread.runs) > self.max_runs_per_thread:
            self._forget_oldest_runs(thread)
        self._shed(thread)
        return RunStarted(thread=thread.record(), replaces=replaces)

    async def finish_run(self, outcome: RunOutcome) -> None:
        self._check_open()
        thread = self._threads.get(outcome.thread_id)
        run = None if thread is None else thread.runs.get(outcome.run_id)
        if thread is None or run is None:  # e.g. the thread was deleted while the run went on
            raise NotFound("run not found")
        if run.status != "running":  # a retry: the outcome is already there
            return
        calls, chars = [], len(outcome.answer_text)
        for call in outcome.tool_calls:
            (args, args_chars), (result, result_chars) = _as_json(call.args), _as_json(call.result)
            chars += args_chars + result_chars + len(call.error or "")
            calls.append(attrs.evolve(call, run_id=run.id, args=args, result=result))
        run.status, run.ended_at, run.duration_ms = outcome.status, outcome.ended_at, outcome.duration_ms
        run.usage, run.error_code, run.cancel_reason = dict(outcome.usage), outcome.error_code, outcome.cancel_reason
        run.tool_calls = tuple(calls)
        if run.approvals:
            for key, approval in run.approvals.items():
                if approval.status == "pending":
                    run.approvals[key] = attrs.evolve(approval, status="cancelled", decided_at=outcome.ended_at)
        if outcome.answer_text:  # a run that failed before any text leaves no empty turn
            self._add(thread, StoredMessage(
                id=outcome.answer_message_id, thread_id=thread.id, role="assistant",
                text=outcome.answer_text, run_id=run.id, client_id=None, created_at=outcome.ended_at,
            ))  # fmt: skip
        thread.updated_at = outcome.ended_at
        self._threads.move_to_end(thread.id)
        self._charge(thread, run.id, chars)
        self._shed(thread)

    #: It returns without a checkpoint (nothing here waits), so a caller
    #: recording an outcome during a teardown needs no shield around it. A
    #: subclass overriding finish_run does not inherit this.
    finish_run.never_waits = True  # type: ignore[attr-defined]

    async def record_approval(self, approval: ApprovalRecord) -> None:
        self._check_open()
        thread = self._threads.get(approval.thread_id)
        run = None if thread is None else thread.runs.get(approval.run_id)
        if thread is None or run is None:  # e.g. the thread was deleted while the run waited
            raise NotFound("run not found")
        if run.approvals is None:
            run.approvals = {}
        earlier = run.approvals.get(approval.tool_call_id)
        if earlier is None:
            (args, chars) = _as_json(approval.args)
            run.approvals[approval.tool_call_id] = attrs.evolve(approval, args=args)
            self._charge(thread, run.id, chars + len(approval.reason or ""))
        elif earlier.status == "pending":  # as in SQL: only a pending one takes a decision
            edited, chars = _as_json(approval.edited_args) if approval.edited_args is not None else (None, 0)
            run.approvals[approval.tool_call_id] = attrs.evolve(
                earlier, status=approval.status, decided_at=approval.decided_at,
                edited_args=edited, reason=approval.reason,
            )  # fmt: skip
            self._charge(thread, run.id, chars + len(approval.reason or ""))
        self._shed(thread)

    async def close_orphaned_runs(self, node_id: str | None = None) -> int:
        """Nothing to close: no other process ever wrote here."""
        self._check_open()
        if node_id == self.node_id:
            raise ValueError("a store cannot close its own node's runs")
        return 0

    # -- reads and deletes ----------------------------------------------------

    async def history(self, thread_id: str, *, limit: int) -> list[StoredMessage]:
        self._check_open()
        thread = self._threads.get(thread_id)
        if thread is None or limit <= 0:
            return []
        self._threads.move_to_end(thread_id)
        return [m for _, _, m in thread.messages[-limit:]]

    async def list_threads(self, user_id: str, *, limit: int = 100) -> list[ThreadRecord]:
        self._check_open()
        if limit <= 0:
            return []
        threads = (self._threads[t] for t in self._by_user.get(user_id, ()))
        return [t.record() for t in heapq.nsmallest(limit, threads, key=lambda t: (-t.updated_at, t.id))]

    async def get_thread(
        self, user_id: str, thread_id: str
    ) -> tuple[ThreadRecord, list[StoredMessage], list[RunRecord]]:
        self._check_open()
        thread = self._owned(user_id, thread_id)
        self._threads.move_to_end(thread_id)
        runs = sorted(thread.runs.values(), key=lambda r: (r.started_at, r.id))
        return thread.record(), [m for _, _, m in thread.messages], [r.record() for r in runs]

    async def delete_thread(self, user_id: str, thread_id: str) -> None:
        self._check_open()
        self._forget(self._owned(user_id, thread_id))

    # -- plumbing ----------------------------------------------------------

    def _owned(self, user_id: str, thread_id: str) -> _Thread:
        thread = self._threads.get(thread_id)
        if thread is None or thread.user_id != user_id:
            # The same answer for "absent" and "someone else's": ids do not leak.
            raise NotFound("thread not found")
        return thread

    @staticmethod
    def _retry_starts_new_run(thread: _Thread, run_id: str | None) -> bool:
        run = thread.runs.get(run_id) if run_id is not None else None
        if run is None:  # as in SQL: a message whose run is unknown stays a duplicate
            return False
        return retry_starts_new_run(run.status, run.cancel_reason, run.error_code)

    def _new_thread(self, start: RunStart) -> _Thread:
        thread = _Thread(
            id=start.new_thread_id, user_id=start.user_id, title=_title(start.text),
            created_at=start.started_at, updated_at=start.started_at, client_id=start.client_id,
        )  # fmt: skip
        self._threads[thread.id] = thread
        self._by_user.setdefault(thread.user_id, {})[thread.id] = None
        if start.client_id is not None:
            self._started[(start.user_id, start.client_id)] = thread.id
        return thread

    def _charge(self, thread: _Thread, run_id: str, chars: int) -> None:
        thread.sizes[run_id] = thread.sizes.get(run_id, 0) + chars
        thread.chars += chars
        self._chars += chars

    def _shed(self, keep: _Thread) -> None:
        """Forget least recently used threads while over a bound, never
        ``keep`` (the one just written, most recently used): a single thread
        over the text budget is bounded by max_runs_per_thread instead."""
        while len(self._threads) > self.max_threads or self._chars > self.max_text_chars:
            oldest = next(iter(self._threads.values()))
            if oldest is keep:
                return
            self._forget(oldest)

    def _add(self, thread: _Thread, message: StoredMessage) -> _Entry:
        self._seq += 1
        entry = (message.created_at, self._seq, message)
        messages = thread.messages
        if not messages or messages[-1][:2] <= entry[:2]:
            messages.append(entry)  # the usual case: in order
        else:
            bisect.insort(messages, entry, key=lambda e: e[:2])
        return entry

    def _release(self, thread: _Thread, entry: _Entry) -> None:
        """Take the client id off its message: the id moves to a new run."""
        created_at, seq, message = entry
        del thread.ids[message.client_id]  # type: ignore[arg-type]
        i = bisect.bisect_left(thread.messages, (created_at, seq), key=lambda e: e[:2])
        thread.messages[i] = (created_at, seq, attrs.evolve(message, client_id=None))

    def _forget_oldest_runs(self, thread: _Thread) -> None:
        keep = self.max_runs_per_thread * 3 // 4
        runs = list(thread.runs)
        gone = set(runs[: len(runs) - keep])
        thread.runs = {r: thread.runs[r] for r in runs[len(runs) - keep :]}
        freed = sum(thread.sizes.pop(r, 0) for r in gone)
        thread.chars -= freed
        self._chars -= freed
        thread.messages = [e for e in thread.messages if e[2].run_id not in gone]
        thread.ids = {cid: e for cid, e in thread.ids.items() if e[2].run_id not in gone}
        if thread.client_id is not None and thread.client_id not in thread.ids:
            # the message that started the thread is forgotten, and its id with it
            self._started.pop((thread.user_id, thread.client_id), None)
            thread.client_id = None

    def _forget(self, thread: _Thread) -> None:
        del self._threads[thread.id]
        self._chars -= thread.chars
        owned = self._by_user.get(thread.user_id)
        if owned is not None:
            owned.pop(thread.id, None)
            if not owned:
                del self._by_user[thread.user_id]
        if thread.client_id is not None:
            self._started.pop((thread.user_id, thread.client_id), None)
