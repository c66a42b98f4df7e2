"""One ``/agui`` run, from its admission to its end, and the request that
streams it.

An AG-UI run can outlive the request that started it: at a tool call that
waits for its user's approval, the stream ends with the interrupt outcome
while the netra run goes on waiting, and a later request (a resume) streams
the rest. So the run is not owned by a request. An :class:`AguiRun` owns it:
its :class:`netra.runs.RunTable` (one run) starts it in the AG-UI run
table's nursery (:mod:`netra.agui._runs`, on the hub), and the AguiRun is
the table's event sink. A request is a *subscriber*: it streams the run's
events while it is attached.

- **Attached** (a request streams it): the run is the request's, as a run
  is its WebSocket connection's. The request going away before the run's
  end or an interrupt cancels the run (:meth:`detach` with a cancel); a
  client that takes nothing while ``outbox_size`` events wait is a slow
  consumer, and its run is cancelled.
- **Parked** (the stream ended at an interrupt): nobody streams it; its
  events wait here for the request that resumes it. The run waits for its
  decisions, from that resume or from any ``/ws`` connection of its user,
  for at most ``approval_timeout_s`` (then the call is denied and the run
  goes on), and can be cancelled (``/ws`` cancel, another run on the thread
  with ``interrupt``, the drain). A run that ends parked is over: its
  outcome is recorded in the thread, its remaining events are dropped.
  Events that would pass ``outbox_size`` while parked are dropped too, and
  the run can no longer be resumed over AG-UI (its waiting calls can still
  be decided from ``/ws``); it goes on to its end.

For the server, an AguiRun is a connection of its user from admission to
its end (``hub.sessions``, ``user.connections``): it counts against the
connection limits while attached, and only against the server's while
parked (``detached``, like a dropped WebSocket session that waits for a
resume); the drain waits for its run and then cancels it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ..approvals import shown_name
from ..protocol import TERMINAL, AgentThinking, ApprovalRequired, Event, TextDelta, ToolExecuting
from ..runs import Run, RunTable
from ._interrupts import interrupt_id

if TYPE_CHECKING:
    from ..hub import Hub
    from ..limits import UserState
    from ..tools import Tool
    from ._events import RunEvents
    from ._runs import AguiRuns

log = logging.getLogger("netra.agui")


class Subscriber(Protocol):
    """A request streaming a run: told when events are there to take."""

    def wake(self) -> None: ...


@attrs.define(eq=False, kw_only=True)
class AguiRun:
    hub: Hub
    table: AguiRuns
    user: UserState
    thread_id: str
    #: This run's table (one run): see netra.runs. Its sink is this object.
    runs: RunTable = attrs.field(init=False)
    run: Run | None = None
    #: The request streaming the run; None while parked (or before its end, cut off).
    subscriber: Subscriber | None = None
    #: The translator of the stream that ended at the last interrupt: the
    #: stream that resumes the run continues from it.
    events: RunEvents | None = None
    #: The interrupts this run ended a stream with, by interrupt id: what a resume may answer.
    raised: dict[str, ApprovalRequired] = attrs.field(factory=dict)
    #: Set when the run is over and nobody streams it any more.
    over: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the run's task has ended (its capacity is back).
    ran: trio.Event = attrs.field(factory=trio.Event)
    _pending: list[Event] = attrs.field(factory=list)  # events no request has taken yet
    #: Calls that asked for approval and whose decision has not shown yet, by netra tool call id.
    _asked: dict[str, ApprovalRequired] = attrs.field(factory=dict)
    _cut: bool = False  # a slow consumer: nothing more is queued but the terminal event
    _lost: bool = False  # overflowed while parked: nothing more is queued

    def __attrs_post_init__(self) -> None:
        self.runs = RunTable(self.hub, self.user, self)

    @property
    def detached(self) -> bool:
        """Parked: nobody streams the run (it counts as no open connection of its user)."""
        return self.subscriber is None

    @property
    def user_id(self) -> str:
        return self.user.user_id

    # -- the run table's sink ----------------------------------------------------

    def send(self, event: Event) -> None:
        """Queue an event of this run; never blocks."""
        kind = event.type
        if type(event) is ApprovalRequired:
            self._asked[event.tool_call_id] = event
        elif type(event) is ToolExecuting:  # decided (approved, denied or timed out)
            self._asked.pop(event.tool_call_id, None)
        elif kind in TERMINAL:
            self._asked.clear()
        if self._lost or (self._cut and kind not in TERMINAL):
            return
        pending = self._pending
        last = pending[-1] if pending else None
        if type(event) is TextDelta and type(last) is TextDelta:
            pending[-1] = attrs.evolve(last, delta=last.delta + event.delta)
        elif type(event) is AgentThinking and type(last) is AgentThinking and last.step == event.step:
            pending[-1] = attrs.evolve(last, text=last.text + event.text)
        else:
            if len(pending) >= self.hub.config.outbox_size and not self._cut:
                self.hub.metrics.outbox_full.inc()
                if self.subscriber is None:
                    self._lose()
                    return
                self._slow_consumer()
                if kind not in TERMINAL:
                    return
            pending.append(event)
        if self.subscriber is not None:
            self.subscriber.wake()

    def _slow_consumer(self) -> None:
        log.info("slow consumer", extra={"user_id": self.user_id})
        self._cut = True
        self._pending.clear()
        self.cancel("disconnect", cause="slow_consumer")

    def _lose(self) -> None:
        """Too much happened while parked: the events are dropped, and the
        run can no longer be resumed over AG-UI. It goes on to its end."""
        log.info("a paused AG-UI run overflowed; it can no longer be resumed", extra={"user_id": self.user_id})
        self._lost = True
        self._pending.clear()
        self.table.forget(self)

    # -- what a subscriber does ------------------------------------------------------

    def take(self) -> list[Event]:
        """Every event queued, in order, for the subscriber to translate."""
        events, self._pending = self._pending, []
        return events

    def asking(self) -> bool:
        """Whether a queued event asks for an approval still waiting: the stream will end at it."""
        return any(type(e) is ApprovalRequired and self._asked.get(e.tool_call_id) is e for e in self._pending)

    def still_asked(self, asks: Sequence[ApprovalRequired]) -> list[ApprovalRequired]:
        """Of these approval requests, those still waiting for a decision
        (as far as this run's events tell: none decided, the run not ended)."""
        return [a for a in asks if self._asked.get(a.tool_call_id) is a]

    def waiting(self) -> dict[str, ApprovalRequired]:
        """The interrupts raised that still wait for a decision, by interrupt id."""
        return {iid: ask for iid, ask in self.raised.items() if self._asked.get(ask.tool_call_id) is ask}

    def tool_named(self, shown: str) -> Tool | None:
        """One of the run's agent's tools, by the name users see (for an
        interrupt's schema and an edit's check)."""
        if self.run is None:
            return None
        registry = self.hub.agent_tools.get(self.run.agent.name, {})
        return next((t for t in registry.values() if shown_name(t) == shown), None)

    def attach(self, subscriber: Subscriber) -> None:
        """A request streams the run from here on."""
        assert self.subscriber is None
        self.subscriber = subscriber
        if self._pending:
            subscriber.wake()

    def park(
        self, subscriber: Subscriber, events: RunEvents, asks: Sequence[ApprovalRequired], rest: list[Event]
    ) -> None:
        """``subscriber``'s stream ended at these calls' interrupt: the run
        waits, with the events the stream did not carry (``rest``), for a
        request to resume it."""
        if self.subscriber is subscriber:
            self.subscriber = None
        self.events = events
        self._pending[:0] = rest
        for ask in asks:
            self.raised[interrupt_id(ask.run_id, ask.tool_call_id)] = ask
        if not self._lost:
            self.table.index(self)
        if self.ran.is_set():
            self._finish()

    def detach(self, subscriber: Subscriber, *, cancel: tuple[str, str] | None = None) -> None:
        """``subscriber``'s stream is over. ``cancel`` (reason, cause): it
        ended before the run did or paused it, so the run is cancelled."""
        if self.subscriber is not subscriber:
            return  # parked already (the stream ended at an interrupt)
        self.subscriber = None
        if cancel is not None:
            reason, cause = cancel
            self.cancel(reason, cause=cause)
        if self.ran.is_set():
            self._finish()

    # -- the run's end ---------------------------------------------------------------

    def cancel(self, reason: str, *, cause: str, by: str | None = None) -> None:
        self.runs.cancel_all(reason, by=by or self.user_id, cause=cause)

    def run_ended(self) -> None:
        """The run's task is over. Parked, or never streamed, the AguiRun is
        over with it; attached, once its request has taken the rest."""
        self.ran.set()
        if self.subscriber is None:
            self._finish()
        else:
            self.subscriber.wake()

    def _finish(self) -> None:
        if self.over.is_set():
            return
        hub, user = self.hub, self.user
        self.table.forget(self)
        self._pending.clear()
        hub.sessions.discard(self)
        user.connections.discard(self)
        hub.forget_user_if_idle(user)
        self.over.set()

    def finish_unstarted(self) -> None:
        """The run was refused before it started: no task will end it."""
        self.subscriber = None
        self.ran.set()
        self._finish()

    # -- what the server's drain and gauges see of every connection -------------------

    def close(
        self, code: int | None, reason: str = "", *, cause: str,
        cancel_reason: str = "disconnect", by: str | None = None,
    ) -> None:
        """End the run (``code`` and ``reason`` are a WebSocket's: the run's
        terminal event ends the stream, if one is attached)."""
        self.cancel(cancel_reason, cause=cause, by=by)

    def queued_events(self) -> int:
        return len(self._pending)


@attrs.frozen
class OwnedStarts:
    """The AG-UI run table's nursery, as an AguiRun's run table starts its
    run in it: when the run's task ends, its AguiRun is told."""

    nursery: trio.Nursery
    owner: AguiRun

    def start_soon(self, fn: Any, *args: Any, name: object = None) -> None:
        self.nursery.start_soon(_owned, self.owner, fn, *args, name=name)


async def _owned(owner: AguiRun, fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    finally:
        owner.run_ended()
