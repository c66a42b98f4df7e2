"""The AG-UI run table: every ``/agui`` run of this server, on the hub.

Its nursery is started with the hub (:meth:`netra.hub.Hub.open`, in the
server's services nursery), so a run started over ``/agui`` lives as long
as its own rules say, not as long as the request that started it: a run
paused at an interrupt outlives that request (see :mod:`netra.agui._run`
for who owns a run when). The table also indexes the interrupts that paused
runs ended their streams with, so that a resume finds its run:

- :meth:`AguiRuns.open` admits a new run for a request, which streams it;
- :meth:`AguiRuns.plan` reads a resume against the runs paused here: the
  caller's own run on that thread, every interrupt it waits on answered,
  each answer checked as a ``/ws`` ``tool_decision`` is. It decides
  nothing, so a request can be refused before its stream with nothing
  changed;
- :meth:`AguiRuns.resume` plans again (time has passed) and, in the same
  scheduler step, attaches the request and applies the decisions.

A resume entry naming an interrupt that no longer waits (decided from
``/ws``, timed out) while its run still goes on is listed as ignored, not
failed on (AG-UI asks producers to go on without such an entry). One that
names no run paused here for this user and thread (unknown, another user's,
or a run already over) finds nothing: NotFound, whoever asks, so ids do
not leak.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from ..errors import BadRequest, Busy, NetraError, NotFound, RateLimited, RunInProgress
from ..protocol import ToolDecision, UserMessage
from ._interrupts import decision_for
from ._run import AguiRun, OwnedStarts, Subscriber

if TYPE_CHECKING:
    from ..auth import Identity
    from ..hub import Hub
    from ..limits import UserState
    from ._input import RunRequest

log = logging.getLogger("netra.agui")

#: The answer to a resume that finds nothing: the same for every cause.
NOTHING_WAITS = "no run of yours on this thread waits on an interrupt with that id"


def connection_refusal(hub: Hub, user: UserState | None) -> NetraError | None:
    """The connection limits of ``/ws``, for one more connection of ``user``."""
    c = hub.config
    attached = 0 if user is None else sum(not s.detached for s in user.connections)
    if len(hub.sessions) >= c.max_connections or attached >= c.max_connections_per_user:
        return RateLimited("too many connections", retry_after_ms=1000)
    return None


@attrs.frozen
class ResumePlan:
    """What a resume does to a paused run: its decisions, by interrupt id,
    and the entries that answer nothing waiting."""

    run: AguiRun
    decisions: tuple[tuple[str, ToolDecision], ...]
    ignored: tuple[str, ...]


@attrs.define(eq=False)
class AguiRuns:
    hub: Hub
    _nursery: trio.Nursery | None = None
    #: The interrupts paused runs wait on, by interrupt id.
    _interrupts: dict[str, AguiRun] = attrs.field(factory=dict)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the AG-UI runs live in, until cancelled (the
        server's services end once the drain has ended every run)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # -- a new run -----------------------------------------------------------------

    def open(self, identity: Identity, request: RunRequest, *, new_thread: bool, subscriber: Subscriber) -> AguiRun:
        """Admit the request's run, streamed by ``subscriber``; NetraError when refused."""
        hub = self.hub
        user = hub.user(identity.user_id)
        refusal = connection_refusal(hub, user)  # again: others may have come since the request was checked
        owner = AguiRun(hub=hub, table=self, user=user, thread_id=request.thread_id)
        hub.sessions.add(owner)
        user.connections.add(owner)
        try:
            if refusal is not None:
                raise refusal
            if self._nursery is None:
                raise Busy("the server is not taking AG-UI runs now", retry_after_ms=1000)
            assert request.text is not None
            owner.runs.nursery = OwnedStarts(self._nursery, owner)  # type: ignore[assignment]
            owner.subscriber = subscriber
            owner.run = owner.runs.start(
                UserMessage(
                    text=request.text, thread_id=None if new_thread else request.thread_id,
                    agent=request.agent, id=request.message_id, multitask=request.multitask,
                ),
                new_thread_id=request.thread_id if new_thread else None,
            )
        except NetraError:
            owner.finish_unstarted()
            raise
        return owner

    # -- a resume --------------------------------------------------------------------

    def plan(self, user_id: str, request: RunRequest) -> ResumePlan:
        """Read a resume against the runs paused here; decides nothing.
        NotFound (nothing of this user's waits on this thread under those
        ids), RunInProgress (another request streams that run now), or
        BadRequest (an interrupt left unanswered, an answer that does not
        fit: the call still waits)."""
        found = {self._interrupts.get(a.interrupt_id) for a in request.resume}
        mine = [r for r in found if r is not None and r.user_id == user_id and r.thread_id == request.thread_id]
        if not mine:
            raise NotFound(NOTHING_WAITS)
        if len(mine) > 1:  # a thread runs one run at a time: cannot happen, but never decide across runs
            raise BadRequest("'resume' answers the interrupts of one run, the thread's latest")
        [owner] = mine
        if owner.subscriber is not None:
            raise RunInProgress("another request is streaming this run; it can be resumed once that one ends")
        waiting = owner.waiting()
        answers = {a.interrupt_id: a for a in request.resume}
        missing = [iid for iid in waiting if iid not in answers]
        if missing:
            raise BadRequest(
                f"'resume' must answer every interrupt the run waits on (resolved, or cancelled to refuse "
                f"the call); not answered: {', '.join(missing)}"
            )
        max_bytes = self.hub.config.max_message_bytes
        decisions = tuple(
            (iid, decision_for(answers[iid], ask, owner.tool_named(ask.tool), max_bytes=max_bytes))
            for iid, ask in waiting.items()
        )
        ignored = tuple(a.interrupt_id for a in request.resume if a.interrupt_id not in waiting)
        return ResumePlan(owner, decisions, ignored)

    def resume(self, identity: Identity, request: RunRequest, *, subscriber: Subscriber) -> tuple[AguiRun, list[str]]:
        """Plan the resume, attach ``subscriber`` to the run and apply the
        decisions, all in one step (nothing can decide in between); the run
        goes on, its events for ``subscriber``. Returns the run and the
        entries ignored."""
        plan = self.plan(identity.user_id, request)
        owner = plan.run
        refusal = connection_refusal(self.hub, owner.user)  # it is this user's connection again
        if refusal is not None:
            raise refusal
        owner.attach(subscriber)  # first: every event after the decisions is the subscriber's
        ignored = list(plan.ignored)
        board = self.hub.approvals
        for iid, decision in plan.decisions:
            try:
                board.decide(identity.user_id, decision)
            except NetraError as exc:  # planned in this same step, so the board agrees; were it not to,
                log.warning("a planned resume decision was refused: %s", exc.message)  # the call waits on
                ignored.append(iid)
        return owner, ignored

    # -- the index of interrupts ---------------------------------------------------------

    def index(self, owner: AguiRun) -> None:
        """``owner`` is paused at its raised interrupts: a resume may name them."""
        for iid in owner.raised:
            self._interrupts[iid] = owner

    def forget(self, owner: AguiRun) -> None:
        """``owner`` can no longer be resumed (it is over, or lost its events)."""
        for iid in owner.raised:
            if self._interrupts.get(iid) is owner:
                del self._interrupts[iid]

    def __len__(self) -> int:
        """Interrupts a resume may name now."""
        return len(self._interrupts)
