"""Runs: one run's state machine, and the table of a session's runs.

A :class:`RunTable` belongs to one session. It admits a ``user_message``
(routing, the thread's multitask rule, queue caps) synchronously, so a
refused message gets its ``error`` before any event of a run; it starts
each run as a task in the session's nursery; it cancels runs; and when a
run ends it releases everything the run held and counts how it ended
(failure containment). It knows nothing of sockets: its events go to an
:class:`EventSink`, which the connection implements.

A run records its user message before any event, waits its turn on the
thread and for capacity (announcing ``run_queued``), runs the agent loop
under the run timeout, records its outcome, and only then sends its one
terminal event; its capacity is held until that event is out of its hands.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from . import errors
from .agents import Agent, route
from .approvals import Approver
from .agents.runner import AgentLoop
from .agents.supervisor import choose_agent, model_routes
from .errors import Busy, InternalError, LLMError, NetraError, NotFound, RunInProgress, RunTimeout
from .limits import acquire_all, all_available, release_all
from .models.base import ChatMessage
from .protocol import (
    TERMINAL,
    AgentCancelled,
    AgentCompleted,
    AgentError,
    AgentStarted,
    AgentThinking,
    Error,
    Event,
    RunEvent,
    RunQueued,
    UserMessage,
)
from .store.base import RunOutcome, RunStart

if TYPE_CHECKING:
    from .hub import Hub
    from .limits import UserState
    from .store.base import ToolCallRecord

log = logging.getLogger("netra.runs")


#: Who cancels a run the operator stopped (drain): neither its user nor another.
SERVER = "server"

#: Endings a run's own user or the operator asked for: not failures.
REQUESTED_ENDINGS = frozenset({"client", "interrupted", "shutdown"})


class Ids:
    """Unique ids for one process: a random prefix and a counter.

    As unique as uuid4 across processes and restarts (48 random bits per
    process, then a counter), at a fraction of its cost; they are names, not
    secrets (ownership is always checked against the user)."""

    __slots__ = ("_prefix", "_n")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._n = 0

    def new(self, kind: str) -> str:
        self._n += 1
        return f"{kind}_{self._prefix}{self._n:08x}"

    @property
    def prefix(self) -> str:
        """This process's part of every id it makes (a cluster maps it to the node)."""
        return self._prefix

    @staticmethod
    def prefix_of(made: str) -> str:
        """The prefix of the process that made the id ``made``."""
        return made.partition("_")[2][:12]


class EventSink(Protocol):
    """Where a run table's events go: the session's connection."""

    def send(self, event: Event) -> None:
        """Queue an event for the client; never blocks."""


@attrs.define(eq=False, kw_only=True)
class Run:
    id: str
    thread_id: str
    new_thread: bool
    user_id: str
    agent: Agent
    text: str
    client_id: str | None
    message_id: str
    user_message_id: str
    #: The agent the message named (None: the supervisor may choose).
    requested_agent: str | None = None
    #: The thread's rule for this run: enqueue, reject or interrupt.
    multitask: str = "enqueue"
    received_at: float = attrs.field(factory=trio.current_time)
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cancel_reason: str | None = None
    #: Who asked for the cancellation: a user id, or SERVER.
    cancelled_by: str | None = None
    #: Why the run did not complete, for metrics: an error code, or a
    #: cancellation's finer cause (``slow_consumer``, ``rate_limited``...).
    cause: str | None = None
    announced: bool = False  # run_queued or agent_started was sent
    started: bool = False  # agent_started was sent
    thought: bool = False  # an agent_thinking was sent
    terminal: str | None = None  # type of the terminal event sent, if any
    executing: bool = False
    pending: bool = True  # counted in the queue until it executes
    exec_started: float | None = None

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    def cancel(self, reason: str, *, by: str, cause: str | None = None) -> None:
        """Stop the run; ``reason`` goes on the wire in ``agent_cancelled``,
        ``by`` (a user id or SERVER) and ``cause`` feed failure containment."""
        if self.finished:
            return
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.cancelled_by = by
            self.cause = cause or reason
        self.cancel_scope.cancel()


@attrs.define(eq=False)
class RunTable:
    """The runs of one session, from admission to their last release."""

    hub: Hub
    user: UserState
    sink: EventSink
    runs: dict[str, Run] = attrs.field(factory=dict)
    #: Runs whose events this session may carry (the sink's isolation check).
    owned: set[str] = attrs.field(factory=set)
    nursery: trio.Nursery | None = None
    # made on first use: most connections sit idle most of the time
    _limiter: trio.CapacityLimiter | None = None
    _idle: trio.Event | None = None

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The per-session run limit."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.hub.config.max_runs_per_connection)
        return self._limiter

    async def wait_idle(self) -> None:
        """Until no run of this session is left."""
        if self.runs:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    # -- admission ------------------------------------------------------------

    def start(self, msg: UserMessage, *, new_thread_id: str | None = None) -> Run:
        """Admit a message and start its run; NetraError when refused. A
        message with no ``thread_id`` starts a thread, named ``new_thread_id``
        when the client chose its name (AG-UI), else a new id."""
        hub, c, user = self.hub, self.hub.config, self.user
        if hub.draining:
            raise Busy("the server is shutting down", retry_after_ms=int(c.drain_grace_s * 1000))
        agent = route(hub.agents, msg.text, msg.agent)
        new_thread = msg.thread_id is None
        ids = hub.ids
        thread_id = msg.thread_id or new_thread_id or ids.new("thr")
        thread = user.thread(thread_id)
        multitask = msg.multitask or c.default_multitask
        if thread.busy:
            if multitask == "reject":
                active = thread.active or thread.waiting[0]
                raise RunInProgress("this thread has a run in progress", run_id=active.id, thread_id=thread_id)
            if multitask == "interrupt":
                for other in [thread.active, *thread.waiting]:
                    if other is not None:
                        other.cancel("interrupted", by=user.user_id)
        if thread.busy or not all_available(self._limiters()):
            if user.pending >= c.max_queued_runs_per_user or hub.queued_runs >= c.max_queued_runs:
                user.release_thread(thread_id)
                raise Busy("capacity is full; try again shortly", retry_after_ms=1000)
        run = Run(
            id=ids.new("run"), thread_id=thread_id, new_thread=new_thread, user_id=user.user_id,
            agent=agent, text=msg.text, client_id=msg.id, requested_agent=msg.agent,
            message_id=ids.new("msg"), user_message_id=ids.new("msg"), multitask=multitask,
        )
        self.runs[run.id] = run
        self.owned.add(run.id)
        user.runs.add(run)
        thread.waiting.append(run)
        user.pending += 1
        hub.queued_runs += 1
        assert self.nursery is not None
        self.nursery.start_soon(self._execute, run, name="netra.runs.execute")
        return run

    def _limiters(self) -> list[trio.CapacityLimiter]:
        return [self.limiter, self.user.run_limiter, self.hub.run_limiter]

    def limiter_name(self, limiter: Any) -> str:
        if limiter is self.limiter:
            return "connection"
        if limiter is self.user.run_limiter:
            return "user"
        name = getattr(limiter, "name", "")  # a cluster's limiter
        if name.startswith("user-runs:"):
            return "cluster_user"
        return "cluster_global" if name == "runs" else "global"

    # -- cancelling -----------------------------------------------------------

    def cancel(self, *, run_id: str | None, thread_id: str | None, by: str) -> int:
        """A client's cancel of its user's run (or of a thread's runs): this
        session's first, else the user's on other connections of this node.
        Each run's ``agent_cancelled`` goes to the session that started it.
        Returns how many were found here: none is ``not_found``, unless a
        cluster may have them (the caller routes it there)."""
        pool = [self.runs.values(), [r for r in self.user.runs if r.id not in self.runs]]
        targets = []
        for runs in pool:
            targets = [r for r in runs if (r.id == run_id if run_id is not None else r.thread_id == thread_id)]
            if targets:
                break
        if not targets and self.hub.cluster is None:
            raise NotFound("no such run in progress")
        for run in targets:
            run.cancel("client", by=by)
        return len(targets)

    def cancel_all(self, reason: str, *, by: str, cause: str) -> None:
        for run in list(self.runs.values()):
            run.cancel(reason, by=by, cause=cause)

    # -- events ---------------------------------------------------------------

    def emit(self, run: Run, event: RunEvent) -> None:
        """Queue an event of ``run``, keeping the run's event rules: nothing
        after the terminal event, and agent_started before anything else."""
        if run.terminal is not None:
            return
        if not run.announced:
            run.announced = True
            self.hub.metrics.time_to_first_event.observe(trio.current_time() - run.received_at)
        kind = event.type
        if kind in TERMINAL:
            # every run has the same shape, even one that ended before its
            # model said anything (or before it left the queue)
            if not run.started:
                self.emit(run, AgentStarted(
                    run_id=run.id, thread_id=run.thread_id, agent=run.agent.name,
                    message_id=run.message_id, ref=run.client_id,
                ))
            if not run.thought:
                self.emit(run, AgentThinking(
                    run_id=run.id, thread_id=run.thread_id, agent=run.agent.name, text="", step=1
                ))
            run.terminal = kind
        elif kind == "agent_started":
            run.started = True
        elif kind == "agent_thinking":
            run.thought = True
        self.sink.send(event)

    # -- one run ------------------------------------------------------------------

    async def _execute(self, run: Run) -> None:
        """The body of a run's task."""
        hub = self.hub
        config, store = hub.config, hub.store
        thread = self.user.thread(run.thread_id)
        loop: AgentLoop | None = None
        recorded = False
        failure: NetraError | None = None
        completed: AgentCompleted | None = None
        held: list[trio.CapacityLimiter] = []
        shared: list[tuple[Any, Any]] = []  # places in the cluster's limiters
        cluster = hub.cluster
        has_thread = False
        started_at = time.time()
        scope = run.cancel_scope
        try:
            with scope:
                try:
                    if cluster is not None:
                        await cluster.register_run(run.user_id, run.id, run.thread_id)
                        if run.multitask == "reject":
                            shared += await self._cluster_thread(run)
                    if model_routes(hub.model, hub.agents, run.requested_agent):
                        # a real model may route better than the rules did
                        run.agent = await choose_agent(
                            hub.model, hub.agents, run.text, None,
                            timeout_s=config.model_first_chunk_timeout_s, limiter=hub.model_gate,
                        )
                    begun = await store.begin_run(RunStart(
                        run_id=run.id,
                        thread_id=None if run.new_thread else run.thread_id,
                        new_thread_id=run.thread_id,
                        user_id=run.user_id,
                        agent=run.agent.name,
                        text=run.text,
                        user_message_id=run.user_message_id,
                        client_id=run.client_id,
                        started_at=started_at,
                    ))
                    if begun.duplicate_of is not None:
                        raise errors.BadRequest(
                            f"message id {run.client_id!r} was already accepted on this thread",
                            run_id=begun.duplicate_of, thread_id=begun.thread.id,
                        )
                    recorded = True
                    lock = thread.lock
                    try:
                        lock.acquire_nowait()
                    except trio.WouldBlock:
                        self._announce(run, None)
                        await lock.acquire()
                    has_thread = True
                    if cluster is not None and not shared:
                        shared += await self._cluster_thread(run)
                    held = await acquire_all(run, self._limiters(), lambda lim: self._announce(run, lim))
                    if cluster is not None:
                        shared += await cluster.take(self._cluster_limiters(run), lambda lim: self._announce(run, lim))
                    thread.waiting.remove(run)
                    thread.active = run
                    self._executing(run)
                    self.emit(run, AgentStarted(
                        run_id=run.id, thread_id=run.thread_id, agent=run.agent.name,
                        message_id=run.message_id, ref=run.client_id,
                    ))
                    # the run's own cancel scope carries its timeout too (and the model's deadlines)
                    timeout = run.agent.timeout_s or config.run_timeout_s
                    scope.deadline = deadline = run.exec_started + timeout if math.isfinite(timeout) else math.inf
                    loop = AgentLoop(
                        run_id=run.id,
                        thread_id=run.thread_id,
                        message_id=run.message_id,
                        agent=run.agent,
                        model=hub.model,
                        tools=hub.agent_tools[run.agent.name],
                        specs=hub.agent_specs[run.agent.name],
                        limits=hub.run_limits(run.agent),
                        emit=lambda event: self.emit(run, event),
                        model_limiter=hub.model_gate,
                        tool_limiters=hub.tool_gates,
                        on_tool_call=self._count_tool_call,
                        on_model_turn=self._count_model_turn,
                        approve=Approver.for_run(
                            hub, run, lambda event: self.emit(run, event), _GlobalPlace(self, run, held, shared)
                        ),
                        run_scope=scope,
                        run_deadline=deadline,
                    )
                    history = await self._history(run)
                    text = await loop.execute(history, run.text)
                    hub.count_tokens(loop.usage)
                    completed = AgentCompleted(
                        run_id=run.id, thread_id=run.thread_id, message_id=run.message_id,
                        text=text, usage=dict(loop.usage), agent=run.agent.name,
                        duration_ms=_ms_since(run.exec_started),
                    )
                except NetraError as exc:
                    failure = exc
                except Exception:
                    log.exception("run %s failed unexpectedly", run.id)
                    failure = InternalError("internal error")
            cancelled = scope.cancelled_caught and run.cancel_reason is not None
            if scope.cancelled_caught and not cancelled and failure is None:
                if loop is not None and loop.model_timeout is not None:  # a model deadline, on the run's scope
                    failure = LLMError(f"the model sent nothing for {loop.model_timeout:g}s")
                else:
                    failure = RunTimeout(f"the run exceeded its {run.agent.timeout_s or config.run_timeout_s:g}s limit")
            if failure is not None and not cancelled:
                run.cause = failure.code
            # the outcome is stored before the terminal event is sent, so a
            # client that reads the thread on agent_completed finds it there
            if cancelled:
                ending = "agent_cancelled"
            elif failure is not None:
                ending = "agent_error"
            else:
                ending = "agent_completed"
            if recorded:
                recorded = False
                await self._record_outcome(run, loop, failure, ending)
            if ending == "agent_cancelled":
                self.emit(run, AgentCancelled(
                    run_id=run.id, thread_id=run.thread_id, reason=run.cancel_reason or "client"
                ))
            elif ending == "agent_error":
                assert failure is not None
                log.info(
                    "run failed: %s", failure.message,
                    extra={"run_id": run.id, "user_id": run.user_id, "code": failure.code},
                )
                self._report_failure(run, failure)
            else:
                self.emit(run, completed)  # type: ignore[arg-type]
        finally:
            # the slot covers the run until its terminal event is queued
            release_all(run, held)
            if cluster is not None:
                cluster.give_back(shared)
                cluster.forget_run(run.user_id, run.id)
            if has_thread:
                thread.lock.release()
            self._ended(run)
            if recorded:  # torn down with its session: no terminal event to send
                await self._record_outcome(run, loop, failure, None)

    # -- in a cluster ---------------------------------------------------------------

    async def _cluster_thread(self, run: Run) -> list[tuple[Any, Any]]:
        """The thread's one place in the cluster: a run of it on another
        node is rejected against, interrupted, or waited for, by the run's
        multitask rule, as a run of it on this node is."""
        cluster = self.hub.cluster
        assert cluster is not None
        limiter = cluster.limiter(f"thread:{run.thread_id}", 1)
        if run.multitask == "reject":
            try:
                return [(limiter, await limiter.acquire_nowait())]
            except trio.WouldBlock:
                others = await cluster.runs_of(run.user_id)
                active = next((rid for rid, (_, tid) in others.items() if tid == run.thread_id and rid != run.id), None)
                raise RunInProgress(
                    "this thread has a run in progress", run_id=active, thread_id=run.thread_id
                ) from None
        if run.multitask == "interrupt":
            await cluster.route_cancel(
                run.user_id, run_id=None, thread_id=run.thread_id, reason="interrupted",
                by=run.user_id, keep=run.id,
            )
        return await cluster.take([limiter], lambda lim: self._announce(run, None))

    def _cluster_limiters(self, run: Run) -> list[Any]:
        cluster, c = self.hub.cluster, self.hub.config
        assert cluster is not None
        return [cluster.limiter(f"user-runs:{run.user_id}", c.max_runs_per_user), cluster.limiter("runs", c.max_runs)]

    def _announce(self, run: Run, limiter: Any) -> None:
        if limiter is None:
            position = len(self.user.thread(run.thread_id).waiting)
        else:
            position = limiter.tasks_waiting if hasattr(limiter, "keeper") else limiter.statistics().tasks_waiting
            position += 1
            self.hub.metrics.limiter_waits.labels(self.limiter_name(limiter)).inc()
        self.emit(run, RunQueued(run_id=run.id, thread_id=run.thread_id, position=position, ref=run.client_id))

    def _report_failure(self, run: Run, failure: NetraError) -> None:
        if run.announced:
            self.emit(run, AgentError(
                run_id=run.id, thread_id=run.thread_id, code=failure.code,
                message=failure.message, retryable=failure.retryable,
            ))
        else:  # refused before it started: no run events, an error for the message
            self.sink.send(Error(
                code=failure.code, message=failure.message, ref=run.client_id,
                run_id=failure.extra.get("run_id"), thread_id=failure.extra.get("thread_id"),
            ))

    async def _history(self, run: Run) -> list[ChatMessage]:
        window = self.hub.config.history_window
        if run.new_thread or window <= 0:
            return []
        stored = await self.hub.store.history(run.thread_id, limit=window + 1)
        # the last stored message is this run's own user message
        return [
            ChatMessage(role=m.role, content=m.text)
            for m in stored
            if m.id != run.user_message_id and m.text
        ][-window:]

    async def _record_outcome(
        self, run: Run, loop: AgentLoop | None, failure: NetraError | None, ending: str | None
    ) -> None:
        """Record how the run ended, even while its session is being torn down."""
        match ending:
            case "agent_completed":
                status = "completed"
            case "agent_error":
                status = "failed"
            case _:  # cancelled, or torn down with its session before any terminal event
                status = "failed" if failure is not None and run.cancel_reason is None else "cancelled"
        outcome = RunOutcome(
            run_id=run.id,
            thread_id=run.thread_id,
            status=status,
            ended_at=time.time(),
            duration_ms=_ms_since(run.exec_started) if run.exec_started is not None else 0,
            answer_message_id=run.message_id,
            answer_text=loop.text if loop else "",
            usage=dict(loop.usage) if loop else {},
            error_code=failure.code if failure and status == "failed" else None,
            cancel_reason=(run.cancel_reason or "disconnect") if status == "cancelled" else None,
            tool_calls=tuple(loop.tool_calls) if loop else (),
        )
        finish_run = self.hub.store.finish_run
        try:
            if getattr(finish_run, "never_waits", False):
                # it cannot be interrupted, so it needs no shield (a cancel scope a run)
                await finish_run(outcome)
            else:
                # shielded from the session's teardown, bounded by the store's timeout
                with trio.CancelScope(shield=True, deadline=trio.current_time() + self.hub.config.store_timeout_s):
                    await finish_run(outcome)
        except NetraError as exc:  # store down, or the thread deleted meanwhile
            log.warning("could not record the outcome of run %s: %s", run.id, exc.message)

    # -- bookkeeping --------------------------------------------------------------

    def _executing(self, run: Run) -> None:
        run.executing = True
        run.exec_started = trio.current_time()
        self._unqueue(run)

    def _unqueue(self, run: Run) -> None:
        if run.pending:
            run.pending = False
            self.user.pending -= 1
            self.hub.queued_runs -= 1

    def _ended(self, run: Run) -> None:
        hub, m = self.hub, self.hub.metrics
        self._unqueue(run)
        if run.executing and run.exec_started is not None:
            m.run_duration.observe(trio.current_time() - run.exec_started)
        outcome = {"agent_completed": "completed", "agent_error": "failed"}.get(run.terminal or "", "cancelled")
        if run.terminal is None and run.cancel_reason is None and not run.announced:
            outcome = "refused"
        hub.count_run(outcome, run.cause or "")
        self._count_containment(run, outcome)
        user = self.user
        thread = user.threads.get(run.thread_id)
        if thread is not None:
            if thread.active is run:
                thread.active = None
            if run in thread.waiting:
                thread.waiting.remove(run)
        user.runs.discard(run)
        user.release_thread(run.thread_id)
        self.runs.pop(run.id, None)
        if run.terminal is None:
            self.owned.discard(run.id)
        if not self.runs and self._idle is not None:
            self._idle.set()
            self._idle = None
        hub.forget_user_if_idle(user)

    def _count_containment(self, run: Run, outcome: str) -> None:
        """Failure containment: every run that did not complete is charged to
        its own user (``runs_failed``) or, when the cause came from outside
        that user and the operator, counted as affected (must stay 0)."""
        m = self.hub.metrics
        if outcome == "failed":
            m.runs_failed.labels(run.cause or "internal_error").inc()
        elif outcome == "cancelled":
            if run.cancel_reason is None:  # torn down from outside, no one asked
                m.runs_affected.labels("unrequested").inc()
            elif run.cancelled_by not in (run.user_id, SERVER):
                m.runs_affected.labels("other_user").inc()
            elif run.cause not in REQUESTED_ENDINGS:
                m.runs_failed.labels(run.cause or "disconnect").inc()

    def _count_tool_call(self, record: ToolCallRecord, outcome: str) -> None:
        self.hub.count_tool_call(record.name, outcome, record.duration_ms / 1000)

    def _count_model_turn(self, outcome: str, first: float | None, total: float) -> None:
        m = self.hub.metrics
        self.hub.model_turn(outcome).observe(total)
        if first is not None:
            m.model_first_event.observe(first)


@attrs.define(eq=False)
class _GlobalPlace:
    """A run's place in the global capacity (``held`` and, in a cluster,
    ``shared`` are the run's own lists of what it holds, so that its
    ending releases exactly what it still has), given back while the run
    waits for its user's approval (see netra.approvals.RunSlot)."""

    table: RunTable
    run: Run
    held: list[trio.CapacityLimiter]
    shared: list[tuple[Any, Any]]

    def give_back(self) -> None:
        limiter = self.table.hub.run_limiter
        if limiter in self.held:
            self.held.remove(limiter)
            limiter.release_on_behalf_of(self.run)
        cluster = self.table.hub.cluster
        if cluster is not None:
            mine = [(lim, lease) for lim, lease in self.shared if lim.name == "runs"]
            for place in mine:
                self.shared.remove(place)
            cluster.give_back(mine)

    async def take_back(self) -> None:
        hub, run = self.table.hub, self.run
        limiter = hub.run_limiter
        if limiter not in self.held:
            await limiter.acquire_on_behalf_of(run)
            self.held.append(limiter)
        cluster = hub.cluster
        if cluster is not None and not any(lim.name == "runs" for lim, _ in self.shared):
            self.shared += await cluster.take([cluster.limiter("runs", hub.config.max_runs)], lambda lim: None)


def _ms_since(t0: float | None) -> int:
    return round((trio.current_time() - t0) * 1000) if t0 is not None else 0
