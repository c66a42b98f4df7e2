"""One run, from an accepted ``user_message`` to exactly one terminal event.

A run is a task in its connection's nursery with its own cancel scope. It
records its user message before any event (so a refused message, e.g. a
thread that is not the user's, gets an ``error`` and no run events), waits
its turn on the thread and for capacity (announcing ``run_queued``), runs the
agent loop under the run timeout, and always ends with one terminal event
while the socket is there, and one recorded outcome (even when the connection
is gone, in a shielded, bounded scope).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

import attrs
import trio

from .agents import Agent
from .agents.runner import AgentLoop
from .agents.supervisor import choose_agent
from .errors import InternalError, NetraError, RunTimeout
from .limits import acquire_all
from .models.base import ChatMessage
from .protocol import AgentCancelled, AgentCompleted, AgentError, AgentStarted, Error, RunQueued
from .store.base import RunOutcome, RunStart

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("netra.runs")


#: Who cancels a run the operator stopped (drain): neither its user nor another.
SERVER = "server"

#: Endings a run's own user or the operator asked for: not failures.
REQUESTED_ENDINGS = frozenset({"client", "interrupted", "shutdown"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@attrs.define(eq=False, kw_only=True)
class Run:
    id: str
    thread_id: str
    new_thread: bool
    user_id: str
    agent: Agent
    text: str
    client_id: str | None
    #: The agent the message named (None: the supervisor chooses).
    requested_agent: str | None = None
    message_id: str = attrs.field(factory=lambda: new_id("msg"))
    user_message_id: str = attrs.field(factory=lambda: new_id("msg"))
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
    #: The idempotency key this run holds in the hub's memory, if any.
    id_key: tuple[str, str, str] | None = None
    terminal: str | None = None  # type of the terminal event sent, if any
    executing: bool = False
    pending: bool = True  # counted in the queue until it executes

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


async def execute(session: Session, run: Run) -> None:
    """The body of a run's task."""
    hub, user = session.hub, session.user
    config, metrics, store = hub.config, hub.metrics, hub.store
    thread = user.thread(run.thread_id)
    loop: AgentLoop | None = None
    recorded = False
    failure: NetraError | None = None
    completed: AgentCompleted | None = None
    started_at = time.time()
    exec_started: float | None = None
    try:
        with run.cancel_scope:
            try:
                # a real model may route better than the rules the session used
                run.agent = await choose_agent(
                    hub.model, hub.agents, run.text, run.requested_agent,
                    timeout_s=config.model_first_chunk_timeout_s, limiter=hub.model_limiter,
                )
                if store is not None:
                    begun = await store.begin_run(
                        RunStart(
                            run_id=run.id,
                            thread_id=None if run.new_thread else run.thread_id,
                            new_thread_id=run.thread_id,
                            user_id=run.user_id,
                            agent=run.agent.name,
                            text=run.text,
                            user_message_id=run.user_message_id,
                            client_id=run.client_id,
                            started_at=started_at,
                        )
                    )
                    if begun.duplicate_of is not None:
                        raise _duplicate(begun.duplicate_of, begun.thread.id, run)
                    recorded = True

                def announce(limiter: trio.CapacityLimiter | None) -> None:
                    if limiter is None:
                        position = len(thread.waiting)
                    else:
                        position = limiter.statistics().tasks_waiting + 1
                        metrics.limiter_waits.labels(session.limiter_name(limiter)).inc()
                    session.emit(run, RunQueued(
                        run_id=run.id, thread_id=run.thread_id, position=position, ref=run.client_id
                    ))

                if thread.active is not None or thread.lock.locked():
                    announce(None)
                async with thread.lock:
                    limiters = [session.run_limiter, user.run_limiter, hub.run_limiter]
                    async with acquire_all(run, limiters, announce):
                        thread.waiting.remove(run)
                        thread.active = run
                        _start_executing(session, run)
                        exec_started = trio.current_time()
                        session.emit(run, AgentStarted(
                            run_id=run.id, thread_id=run.thread_id, agent=run.agent.name,
                            message_id=run.message_id, ref=run.client_id,
                        ))
                        loop = AgentLoop(
                            run_id=run.id,
                            thread_id=run.thread_id,
                            message_id=run.message_id,
                            agent=run.agent,
                            model=hub.model,
                            tools=hub.agent_tools[run.agent.name],
                            specs=hub.agent_specs[run.agent.name],
                            limits=hub.run_limits(run.agent),
                            emit=lambda event: session.emit(run, event),
                            model_limiter=hub.model_limiter,
                            tool_limiters=hub.tool_limiters,
                            on_tool_call=session.count_tool_call,
                            on_model_turn=session.count_model_turn,
                        )
                        timeout = run.agent.timeout_s or config.run_timeout_s
                        try:
                            with trio.fail_after(timeout):
                                history = await _history(session, run)
                                text = await loop.execute(history, run.text)
                        except trio.TooSlowError:
                            raise RunTimeout(f"the run exceeded its {timeout:g}s limit") from None
                        _count_tokens(session, loop)
                        completed = AgentCompleted(
                            run_id=run.id, thread_id=run.thread_id, message_id=run.message_id,
                            text=text, usage=dict(loop.usage), agent=run.agent.name,
                            duration_ms=_ms_since(exec_started),
                        )
            except NetraError as exc:
                failure = exc
            except Exception:
                log.exception("run %s failed unexpectedly", run.id)
                failure = InternalError("internal error")
        if failure is not None and run.cancel_reason is None:
            run.cause = failure.code
        # the outcome is stored before the terminal event is sent, so a client
        # that reads the thread on agent_completed finds the answer there
        if run.cancel_scope.cancelled_caught:
            ending = "agent_cancelled"
        elif failure is not None:
            ending = "agent_error"
        else:
            ending = "agent_completed"
        if recorded:
            recorded = False
            await _record_outcome(session, run, loop, failure, exec_started, ending)
        if ending == "agent_cancelled":
            session.emit(run, AgentCancelled(
                run_id=run.id, thread_id=run.thread_id, reason=run.cancel_reason or "client"
            ))
        elif ending == "agent_error":
            log.info(
                "run failed: %s", failure.message,
                extra={"run_id": run.id, "user_id": run.user_id, "connection_id": session.connection_id,
                       "code": failure.code},
            )
            await _report_failure(session, run, failure)
        else:
            session.emit(run, completed)
    finally:
        session.run_ended(run, exec_started)
        if recorded:  # torn down with its connection: no terminal event to send
            await _record_outcome(session, run, loop, failure, exec_started, None)


def _start_executing(session: Session, run: Run) -> None:
    run.executing = True
    session.unqueue(run)
    session.hub.metrics.runs_active.inc()


async def _report_failure(session: Session, run: Run, failure: NetraError) -> None:
    if run.announced:
        session.emit(run, AgentError(
            run_id=run.id, thread_id=run.thread_id, code=failure.code,
            message=failure.message, retryable=failure.retryable,
        ))
    else:  # refused before it started: no run events, an error for the message
        session.send(Error(
            code=failure.code, message=failure.message, ref=run.client_id,
            run_id=failure.extra.get("run_id"), thread_id=failure.extra.get("thread_id"),
        ))


def _duplicate(original_run_id: str, thread_id: str, run: Run) -> NetraError:
    from .errors import BadRequest

    return BadRequest(
        f"message id {run.client_id!r} was already accepted on this thread",
        run_id=original_run_id, thread_id=thread_id,
    )


async def _history(session: Session, run: Run) -> list[ChatMessage]:
    store = session.hub.store
    window = session.hub.config.history_window
    if store is None or run.new_thread or window <= 0:
        return []
    stored = await store.history(run.thread_id, limit=window + 1)
    # the last stored message is this run's own user message
    return [
        ChatMessage(role=m.role, content=m.text)
        for m in stored
        if m.id != run.user_message_id and m.text
    ][-window:]


def _count_tokens(session: Session, loop: AgentLoop) -> None:
    for kind, value in loop.usage.items():
        if value:
            session.hub.metrics.model_tokens.labels(kind).inc(value)


async def _record_outcome(
    session: Session,
    run: Run,
    loop: AgentLoop | None,
    failure: NetraError | None,
    exec_started: float | None,
    ending: str | None,
) -> None:
    """Record how the run ended, even while its connection is being torn down."""
    match ending:
        case "agent_completed":
            status = "completed"
        case "agent_error":
            status = "failed"
        case _:  # cancelled, or torn down with its connection before any terminal event
            status = "failed" if failure is not None and run.cancel_reason is None else "cancelled"
    outcome = RunOutcome(
        run_id=run.id,
        thread_id=run.thread_id,
        status=status,
        ended_at=time.time(),
        duration_ms=_ms_since(exec_started) if exec_started is not None else 0,
        answer_message_id=run.message_id,
        answer_text=loop.text if loop else "",
        usage=dict(loop.usage) if loop else {},
        error_code=failure.code if failure and status == "failed" else None,
        cancel_reason=(run.cancel_reason or "disconnect") if status == "cancelled" else None,
        tool_calls=tuple(loop.tool_calls) if loop else (),
    )
    with trio.CancelScope(shield=True):
        with trio.move_on_after(session.hub.config.store_timeout_s):
            try:
                await session.hub.store.finish_run(outcome)
            except NetraError as exc:  # store down, or the thread deleted meanwhile
                log.warning("could not record the outcome of run %s: %s", run.id, exc.message)


def _ms_since(t0: float) -> int:
    return round((trio.current_time() - t0) * 1000)
