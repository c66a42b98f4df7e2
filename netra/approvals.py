"""Approval of tool calls: a run that asks its user before a tool acts.

A tool declares that its calls need the user's approval
(``@tool(needs_approval=True)``, or a predicate on the arguments), and an
agent may say otherwise for one of its tools (``Agent.approvals``). When
the model calls such a tool, the run records the request, announces
``approval_required`` and waits; the user answers with ``tool_decision``
from any of their connections. Approved, the call runs, with the user's
edited arguments when they sent some; denied, or unanswered within
``approval_timeout_s``, the model gets a failed call saying so, and the
run goes on.

Two owners share the work:

- the :class:`ApprovalBoard`, one per server (on the hub), holds every call
  waiting for a decision, by user, run and call. A decision is handled
  synchronously by the session that received it, whichever of the user's
  connections that is: it is checked (the caller's own waiting call, edited
  arguments that fit the tool's schema) and wakes the run, or it is refused
  with an ``error`` for that client alone, and the call goes on waiting.
  In a cluster, a decision for a run on another node takes the path of a
  cancel (:func:`route_decision`): checked on the receiving node against
  the approval the shared store holds, then sent to the run's node, whose
  board applies it;
- an :class:`Approver`, one per run, is what the agent loop awaits for each
  call that needs approval. While it waits the run holds no model slot and
  no tool slot (the loop holds neither between a model turn and a tool
  call), and gives its place in the global run capacity back (its
  :class:`RunSlot`), but keeps its user's run slot: a waiting run still
  counts against its user's runs. The run's own time limit is paused meanwhile, since a person
  deciding is not the run working; the wait has its own bound. Cancelling
  the run ends the wait at once, like any cancel.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from . import _json
from .errors import BadRequest, NetraError, NotFound
from .protocol import ApprovalRequired, RunEvent, ToolDecision, parse_client_message
from .store.base import ApprovalRecord, ApprovalStatus
from .tools import Tool, ToolArgumentsError
from .tools.base import ApprovalRule

if TYPE_CHECKING:
    from .hub import Hub
    from .runs import Run
    from .store.base import Store

log = logging.getLogger("netra.approvals")

#: The reason recorded (and told to the model) when nobody decided in time.
TIMEOUT: Final = "timeout"
#: The answer to a decision on nothing: the same for every cause, so ids do not leak.
_NOT_WAITING: Final = "no tool call of yours is waiting for a decision with that run_id and tool_call_id"


def asks_approval(rule: ApprovalRule, args: dict[str, Any]) -> bool:
    """Whether a call with these checked arguments waits for the user. A
    predicate that raises asks: a broken rule must not let a call through."""
    if rule is True or rule is False:
        return rule
    try:
        return bool(rule(args))
    except Exception:
        log.warning("an approval predicate raised; the call asks for approval", exc_info=True)
        return True


@attrs.frozen(kw_only=True)
class Decision:
    """What became of one call that asked: run it (with ``args`` in place of
    the model's, when the user edited them), or refuse it."""

    approved: bool
    #: The user's arguments, already checked against the tool's schema.
    args: dict[str, Any] | None = None
    reason: str | None = None
    #: Nobody decided before the approval expired (``reason`` is TIMEOUT).
    timed_out: bool = False
    #: Refused by netra, not by the user: nobody could be asked (``reason`` says why).
    unasked: bool = False

    @property
    def outcome(self) -> str:
        """For metrics: approved, edited, denied or timeout."""
        if self.approved:
            return "approved" if self.args is None else "edited"
        return TIMEOUT if self.timed_out else "denied"

    def refusal(self) -> str:
        """The failed result a refused call gives the model and the client."""
        if self.timed_out:
            return "not approved: the user did not decide in time (timeout)"
        if self.unasked:
            return f"not approved: {self.reason}"
        return "the user declined this call" + (f": {self.reason}" if self.reason else "")


@attrs.define(eq=False)
class _Waiting:
    """One call waiting for its user's decision."""

    tool: Tool
    decided: trio.Event = attrs.field(factory=trio.Event)
    decision: Decision | None = None


@attrs.define(eq=False)
class ApprovalBoard:
    """Every tool call this server waits on for a decision, by (user, run,
    tool call). Keyed by user, so another user's decision finds nothing,
    exactly like a wrong id: ids do not leak."""

    _waiting: dict[tuple[str, str, str], _Waiting] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self._waiting)

    def decide(self, user_id: str, msg: ToolDecision, *, routable: bool = False) -> bool:
        """Apply a decision of ``user_id`` (from any of their connections of
        this node): True when taken. When no such call of theirs waits here
        (unknown, another user's, already decided, expired): NotFound, or
        False when ``routable`` (a cluster, where it may wait on another
        node: :func:`route_decision`). BadRequest, the call still waiting,
        when the edited arguments do not fit the tool."""
        key = (user_id, msg.run_id, msg.tool_call_id)
        waiting = self._waiting.get(key)
        if waiting is None:
            if routable:
                return False
            raise NotFound(_NOT_WAITING)
        args = msg.args if msg.decision == "approve" else None
        if args is not None:
            _check_edit(waiting.tool, args)
        del self._waiting[key]
        waiting.decision = Decision(approved=msg.decision == "approve", args=args, reason=msg.reason)
        waiting.decided.set()
        return True

    def apply_control(self, message: dict[str, Any]) -> None:
        """A decision another node of the cluster received for a run of this
        one (:func:`route_decision` checked it there). One that finds the
        call no longer waiting lost a race with its timeout or another
        decision, as a cancel may lose one with a run's end."""
        user_id, frame = message.get("user_id"), message.get("decision")
        try:
            if not isinstance(user_id, str) or not isinstance(frame, str):
                raise BadRequest("a decide control message needs user_id and decision")
            decision = parse_client_message(frame)
            if not isinstance(decision, ToolDecision):
                raise BadRequest("a decide control message carries a tool_decision")
            self.decide(user_id, decision)
        except NetraError as exc:
            log.info("a decision from another node was not applied: %s", exc.message)

    def _open(self, key: tuple[str, str, str], tool: Tool) -> _Waiting | None:
        """Start waiting; None when that call already waits (a model that
        gave two calls one id: the second cannot be told apart)."""
        if key in self._waiting:
            return None
        waiting = self._waiting[key] = _Waiting(tool)
        return waiting

    def _close(self, key: tuple[str, str, str], waiting: _Waiting) -> None:
        if self._waiting.get(key) is waiting:
            del self._waiting[key]


def _check_edit(tool: Tool, args: dict[str, Any]) -> None:
    """Edited arguments are checked as the model's are, by the tool's own
    parse_arguments (an MCP tool checks with its server's JSON schema)."""
    try:
        tool.parse_arguments(_json.dumps_str(args))
    except ToolArgumentsError as exc:
        raise BadRequest(
            f"the edited arguments do not fit {shown_name(tool)}: {exc.message}. "
            "The call still waits for a decision."
        ) from None


def shown_name(tool: Tool) -> str:
    """The tool's name as users see it (an MCP tool's ``server.tool``), as in tool_executing."""
    return tool.label or tool.name


async def route_decision(hub: Hub, user_id: str, msg: ToolDecision) -> None:
    """A decision for a call waiting on none of this node's runs: in a
    cluster, the run may be on another node. Found in the cluster's index of
    the user's runs, it is checked here against the approval the shared
    store holds (pending; edited arguments that fit the tool: the deciding
    client gets its error from this node), then sent to the run's node.
    NotFound, BadRequest or StoreError otherwise."""
    cluster = hub.cluster
    assert cluster is not None
    where = (await cluster.runs_of(user_id)).get(msg.run_id)
    if where is None or where[0] == cluster.node_id:
        raise NotFound(_NOT_WAITING)
    node, thread_id = where
    try:
        runs = (await hub.store.get_thread(user_id, thread_id))[2]
    except NotFound:
        raise NotFound(_NOT_WAITING) from None
    pending = next((
        a for r in runs if r.id == msg.run_id for a in r.approvals
        if a.tool_call_id == msg.tool_call_id and a.status == "pending"
    ), None)  # fmt: skip
    if pending is None:
        raise NotFound(_NOT_WAITING)
    if msg.decision == "approve" and msg.args is not None:
        tools = (t for registry in hub.agent_tools.values() for t in registry.values())
        tool = next((t for t in tools if shown_name(t) == pending.tool), None)
        if tool is not None:  # (else the run's node checks it, and a misfit is only logged there)
            _check_edit(tool, msg.args)
    frame = {"type": "tool_decision", "run_id": msg.run_id, "tool_call_id": msg.tool_call_id,
             "decision": msg.decision, "args": msg.args, "reason": msg.reason}
    await cluster.send_control(node, {"op": "decide", "user_id": user_id, "decision": _json.dumps_str(frame)})


@attrs.define(eq=False, kw_only=True)
class Approver:
    """Asks one run's user to approve its tool calls; awaited by the agent
    loop for each call that needs it, and returns the :class:`Decision`."""

    board: ApprovalBoard
    store: Store
    user_id: str
    run_id: str
    thread_id: str
    #: The run's cancel scope, whose deadline is the run's time limit.
    scope: trio.CancelScope
    #: The run's event sink.
    emit: Callable[[RunEvent], None]
    timeout_s: float
    #: Observes how each approval ended (metrics); must not block.
    on_outcome: Callable[[str], None] = lambda outcome: None
    #: The run's place in the global run capacity, given back while its
    #: user decides (None: kept, as by a run outside a run table).
    slot: RunSlot | None = None
    _pauses: int = 0
    _time_left: float = math.inf

    @classmethod
    def for_run(
        cls, hub: Hub, run: Run, emit: Callable[[RunEvent], None], slot: RunSlot | None = None
    ) -> Approver:
        counter = hub.metrics.approvals
        return cls(
            board=hub.approvals, store=hub.store, user_id=run.user_id, run_id=run.id,
            thread_id=run.thread_id, scope=run.cancel_scope, emit=emit,
            timeout_s=hub.config.approval_timeout_s,
            on_outcome=lambda outcome: counter.labels(outcome).inc(), slot=slot,
        )  # fmt: skip

    async def __call__(self, tool_call_id: str, tool: Tool, args: dict[str, Any]) -> Decision:
        """Record the request, announce it, wait for the decision (or the
        approval's expiry: denied, reason TIMEOUT), record it."""
        key = (self.user_id, self.run_id, tool_call_id)
        waiting = self.board._open(key, tool)
        if waiting is None:
            return Decision(approved=False, unasked=True, reason="another call with this id already waits")
        requested_at = time.time()
        deadline = trio.current_time() + self.timeout_s
        record = ApprovalRecord(
            run_id=self.run_id, thread_id=self.thread_id, tool_call_id=tool_call_id, tool=shown_name(tool),
            args=args, status="pending", requested_at=requested_at, expires_at=requested_at + self.timeout_s,
        )  # fmt: skip
        try:
            # recorded first: a client that reads the thread on the event finds it there
            await self._record(record)
            self.emit(ApprovalRequired(
                run_id=self.run_id, thread_id=self.thread_id, tool_call_id=tool_call_id,
                tool=record.tool, args=args, expires_at_ms=_epoch_ms(record.expires_at),
            ))  # fmt: skip
            with self._run_clock_paused(), trio.move_on_at(deadline):
                await waiting.decided.wait()
            if self._pauses == 0 and self.slot is not None:
                await self.slot.take_back()  # may wait, as a run waits for capacity
        except trio.Cancelled:
            self.on_outcome("cancelled")  # the run records it as cancelled when it ends
            raise
        finally:
            self.board._close(key, waiting)
        decision = waiting.decision or Decision(approved=False, reason=TIMEOUT, timed_out=True)
        self.on_outcome(decision.outcome)
        status: ApprovalStatus = "approved" if decision.approved else "denied"
        await self._record(attrs.evolve(
            record, status=status, decided_at=time.time(), edited_args=decision.args, reason=decision.reason
        ))  # fmt: skip
        return decision

    async def _record(self, record: ApprovalRecord) -> None:
        """Best effort: the decision is the board's to take, so a store that
        does not answer costs the thread's record of it, not the run."""
        try:
            await self.store.record_approval(record)
        except NetraError as exc:
            log.warning(
                "could not record an approval (%s) of run %s: %s", record.status, self.run_id, exc.message,
                extra={"run_id": self.run_id, "user_id": self.user_id},
            )

    @contextmanager
    def _run_clock_paused(self) -> Iterator[None]:
        """The run's time limit does not run while its user decides. Calls
        of one step may wait at once: the first pause stops the clock, the
        last resume restarts it with the time that was left."""
        scope = self.scope
        if self._pauses == 0:
            self._time_left = scope.deadline - trio.current_time()
            scope.deadline = math.inf
            if self.slot is not None:
                self.slot.give_back()
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0 and math.isfinite(self._time_left):
                scope.deadline = trio.current_time() + self._time_left


class RunSlot(Protocol):
    """A run's place in the global run capacity (this node's, and the
    cluster's): a run waiting for its user holds no place another user's
    run could use, but still counts against its own user's runs."""

    def give_back(self) -> None: ...

    async def take_back(self) -> None: ...


def _epoch_ms(seconds: float) -> int:
    return int(seconds * 1000)
