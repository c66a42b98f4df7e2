"""netra's run events, as AG-UI events: one run, translated event by event.

A netra run streams flat events (``text_delta``, ``tool_executing``...);
AG-UI brackets them (a text message, a reasoning message, a step and a tool
call each start and end). The :class:`RunEvents` translator keeps what is
open, closes it before anything else happens, and closes everything before
the run's one terminal event, so that the official client's verifier
accepts the stream however the run ended. The table in docs/agui.md is this
module, event by event.

Ids. The assistant message is netra's answer message (its ``message_id``),
so text, tool calls and the stored thread all name the same message. A
netra tool call id is unique within its run only (a scripted model calls
``call_1`` in every run), while an AG-UI client keeps tool calls across the
runs of a thread, so a tool call id on the wire is ``<netra run id>.<tool
call id>``. The run id on the wire is the client's ``runId``; netra's run
id (the one ``/api/threads`` shows) travels in the ``netra`` metadata of
``RUN_STARTED`` and of the terminal event.

A run that waits for its user's approval of tool calls ends its stream
with the interrupt outcome (:meth:`RunEvents.interrupt`); the stream that
resumes it (:meth:`RunEvents.continued`) goes on from where that one
stopped: the same answer message, the same step, and the calls it already
announced are not announced twice.

Pure: events in, ``ag_ui.core`` models out, no I/O, so every rule here can
be checked without a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
from ag_ui.core import (
    PROTOCOL_VERSION,
    BaseEvent,
    CustomEvent,
    ReasoningEndEvent,
    ReasoningMessageContentEvent,
    ReasoningMessageEndEvent,
    ReasoningMessageStartEvent,
    ReasoningStartEvent,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunFinishedInterruptOutcome,
    RunStartedEvent,
    StepFinishedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TokenUsage,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)

from .. import _json
from ..errors import NetraError
from ..tools import Tool
from ._interrupts import META as META, interrupt_for, wire_call_id
from ..protocol import (
    AgentCancelled,
    AgentCompleted,
    AgentError,
    AgentStarted,
    AgentThinking,
    ApprovalRequired,
    Error,
    RunQueued,
    TextDelta,
    ToolCompleted,
    ToolExecuting,
)

#: CUSTOM event names: netra's events that AG-UI has no event for.
RUN_QUEUED: Final = "netra.run_queued"
AGENT_STARTED: Final = "netra.agent_started"


@attrs.define(eq=False, kw_only=True)
class RunEvents:
    """The translator of one run's events (a stream holds exactly one)."""

    #: The thread and the client's run id, as the client named them.
    thread_id: str
    run_id: str
    #: netra's id of the run (set when it was admitted).
    netra_run_id: str | None = None
    agent: str | None = None
    #: netra's answer message: the assistant message on the wire.
    message_id: str | None = None
    #: Set once the terminal event (RUN_FINISHED or RUN_ERROR) is out: nothing follows it.
    ended: bool = False
    #: The stream ended at an interrupt: the run waits for the answers.
    interrupted: bool = False
    _text_open: bool = False
    _reasoning: str | None = None  # the open reasoning message
    _reasonings: int = 0
    _step: str | None = None  # the open step's name
    _step_no: int | None = None  # the run's current step, open or not
    #: Tool calls announced (start, args, end), by wire id: their arguments.
    _announced: dict[str, Any] = attrs.field(factory=dict)
    #: Announced calls that ran with other arguments (the user's edit), until their result.
    _ran_with: dict[str, Any] = attrs.field(factory=dict, init=False)

    def continued(self, run_id: str) -> RunEvents:
        """The translator of the stream that resumes this one's run (the
        client's new ``runId``): it goes on with this one's answer message,
        step, reasoning count and announced tool calls."""
        return RunEvents(
            thread_id=self.thread_id, run_id=run_id, netra_run_id=self.netra_run_id, agent=self.agent,
            message_id=self.message_id, reasonings=self._reasonings, step_no=self._step_no,
            announced=dict(self._announced),
        )  # fmt: skip

    # -- what the stream asks for ---------------------------------------------

    def started(self, netra_run_id: str, agent: str, *, ts: int, ignored: Sequence[str] = ()) -> list[BaseEvent]:
        """RUN_STARTED: the run was admitted (it may still wait its turn).
        ``ignored``: resume entries the input carried that answer nothing waiting."""
        self.netra_run_id, self.agent = netra_run_id, agent
        meta: dict[str, Any] = {"run_id": netra_run_id, "agent": agent}
        if ignored:
            meta["resume_ignored"] = list(ignored)
        return [RunStartedEvent(
            thread_id=self.thread_id, run_id=self.run_id, protocol_version=PROTOCOL_VERSION,
            timestamp=ts, metadata={META: meta},
        )]

    def resumed(self, *, ts: int, ignored: Sequence[str] = ()) -> list[BaseEvent]:
        """RUN_STARTED of a resumed run, and the step it stopped in, open again
        (what comes next is that step's tool results). ``ignored``: resume
        entries that answered nothing waiting (listed, not failed on)."""
        meta: dict[str, Any] = {"run_id": self.netra_run_id, "agent": self.agent, "resumed": True}
        if ignored:
            meta["resume_ignored"] = list(ignored)
        out: list[BaseEvent] = [RunStartedEvent(
            thread_id=self.thread_id, run_id=self.run_id, protocol_version=PROTOCOL_VERSION,
            timestamp=ts, metadata={META: meta},
        )]  # fmt: skip
        if self._step_no is not None:
            out += self._open_step(self._step_no, ts)
        return out

    def interrupt(
        self, asks: Sequence[ApprovalRequired], *, ts: int, tool_of: Callable[[str], Tool | None] = lambda name: None
    ) -> list[BaseEvent]:
        """The end of the stream at calls waiting for approval: what is open
        is closed, each call is announced (with the model's arguments) unless
        it was already, and RUN_FINISHED carries one interrupt per call.
        ``tool_of`` finds a tool by the name users see, for the schema of its
        arguments."""
        out = self._close_open(ts)
        for ask in asks:
            call_id = wire_call_id(ask.run_id, ask.tool_call_id)
            if call_id not in self._announced:
                out += self._announce(call_id, ask.tool, ask.args, ts)
        out += self._close_all(ts)
        self.interrupted = True
        outcome = RunFinishedInterruptOutcome(interrupts=[interrupt_for(ask, tool_of(ask.tool)) for ask in asks])
        return self._end([*out, RunFinishedEvent(
            thread_id=self.thread_id, run_id=self.run_id, outcome=outcome, timestamp=ts,
            metadata={META: {"run_id": self.netra_run_id, "agent": self.agent}},
        )])  # fmt: skip

    def refused(self, error: NetraError, *, ts: int) -> list[BaseEvent]:
        """RUN_ERROR for a run that was never admitted (capacity, a busy thread)."""
        extra = {k: v for k, v in error.extra.items() if k in ("retry_after_ms", "run_id", "thread_id")}
        return self._end([RunErrorEvent(
            message=error.message, code=error.code, timestamp=ts,
            metadata={META: {"retryable": error.retryable, **extra}},
        )])

    def translate(self, event: Any, *, ts: int) -> list[BaseEvent]:
        """The AG-UI events for one netra event of this run (none after the end)."""
        if self.ended:
            return []
        match event:
            case TextDelta(delta=delta):
                out = self._close_reasoning(ts)
                if not self._text_open:
                    self._text_open = True
                    out.append(TextMessageStartEvent(message_id=self._message(event), role="assistant", timestamp=ts))
                out.append(TextMessageContentEvent(message_id=self._message(event), delta=delta, timestamp=ts))
                return out
            case AgentThinking(step=step, text=text):
                return self._thinking(step, text, ts)
            case ToolExecuting():
                call_id = self._call_id(event.tool_call_id)
                if call_id in self._announced and self._announced[call_id] != event.args:
                    self._ran_with[call_id] = event.args
                return [*self._close_open(ts), *self._tool_call(event, ts)]
            case ToolCompleted():
                return [*self._close_open(ts), self._tool_result(event, ts)]
            case AgentStarted(agent=agent, message_id=message_id):
                self.agent, self.message_id = agent, message_id
                value = {"agent": agent, "message_id": message_id, "run_id": event.run_id}
                return [CustomEvent(name=AGENT_STARTED, value=value, timestamp=ts)]
            case RunQueued(position=position):
                return [CustomEvent(name=RUN_QUEUED, value={"position": position}, timestamp=ts)]
            case AgentCompleted():
                return self._finish(event, ts)
            case AgentError(code=code, message=message, retryable=retryable):
                return self._end([*self._close_all(ts), RunErrorEvent(
                    message=message, code=code, timestamp=ts,
                    metadata={META: {"run_id": event.run_id, "retryable": retryable}},
                )])
            case AgentCancelled(reason=reason):
                return self._end([*self._close_all(ts), RunFinishedEvent(
                    thread_id=self.thread_id, run_id=self.run_id, outcome=RunFinishedCancelledOutcome(),
                    timestamp=ts, metadata={META: {"run_id": event.run_id, "cancel_reason": reason}},
                )])
            case Error(code=code, message=message):  # refused after admission, before it started
                meta = {k: v for k, v in (
                    ("retry_after_ms", event.retry_after_ms), ("run_id", event.run_id), ("thread_id", event.thread_id),
                ) if v is not None}
                return self._end([*self._close_all(ts), RunErrorEvent(
                    message=message, code=code, timestamp=ts, metadata={META: meta},
                )])
        return []

    # -- pieces ----------------------------------------------------------------

    def _message(self, event: Any) -> str:
        if self.message_id is None:
            self.message_id = event.message_id
        return self.message_id

    def _thinking(self, step: int, text: str, ts: int) -> list[BaseEvent]:
        """A model step starts a STEP; what it says while thinking is a reasoning message."""
        out: list[BaseEvent] = []
        if f"step {step}" != self._step:
            out += self._close_open(ts)
            if self._step is not None:
                out.append(StepFinishedEvent(step_name=self._step, timestamp=ts))
            out += self._open_step(step, ts)
        if text:
            out += self._close_text(ts)
            if self._reasoning is None:
                self._reasonings += 1
                self._reasoning = f"{self.netra_run_id}.thinking.{self._reasonings}"
                out.append(ReasoningStartEvent(message_id=self._reasoning, timestamp=ts))
                out.append(ReasoningMessageStartEvent(message_id=self._reasoning, role="reasoning", timestamp=ts))
            out.append(ReasoningMessageContentEvent(message_id=self._reasoning, delta=text, timestamp=ts))
        return out

    def _open_step(self, step: int, ts: int) -> list[BaseEvent]:
        self._step, self._step_no = f"step {step}", step
        return [StepStartedEvent(
            step_name=self._step, timestamp=ts, metadata={META: {"agent": self.agent, "step": step}},
        )]  # fmt: skip

    def _tool_call(self, event: ToolExecuting, ts: int) -> list[BaseEvent]:
        """A netra tool call starts with its arguments known: start, args and
        end at once; a call announced when it asked for approval is not
        announced again (its result says which arguments it ran with)."""
        call_id = self._call_id(event.tool_call_id)
        if call_id in self._announced:
            return []
        return self._announce(call_id, event.tool, event.args, ts)

    def _announce(self, call_id: str, tool: str, args: dict[str, Any], ts: int) -> list[BaseEvent]:
        self._announced[call_id] = args
        return [
            ToolCallStartEvent(
                tool_call_id=call_id, tool_call_name=tool, parent_message_id=self.message_id, timestamp=ts,
            ),
            ToolCallArgsEvent(tool_call_id=call_id, delta=_json.dumps_str(args), timestamp=ts),
            ToolCallEndEvent(tool_call_id=call_id, timestamp=ts),
        ]

    def _tool_result(self, event: ToolCompleted, ts: int) -> ToolCallResultEvent:
        """What the tool returned, as the model reads it: a failed call is ``{"error": ...}``."""
        call_id = self._call_id(event.tool_call_id)
        failed = event.error is not None
        content = _json.dumps_str({"error": event.error} if failed else event.result)
        meta: dict[str, Any] = {"tool": event.tool, "duration_ms": event.duration_ms}
        if failed:
            meta["error"] = event.error
        ran_with = self._ran_with.pop(call_id, None)
        if ran_with is not None:  # the user edited the arguments the call was announced with
            meta["args"] = ran_with
        return ToolCallResultEvent(
            message_id=f"{call_id}.result", tool_call_id=call_id, content=content, role="tool",
            timestamp=ts, metadata={META: meta},
        )

    def _call_id(self, tool_call_id: str) -> str:
        return wire_call_id(self.netra_run_id or "", tool_call_id)

    def _finish(self, event: AgentCompleted, ts: int) -> list[BaseEvent]:
        meta = {"run_id": event.run_id, "agent": event.agent, "duration_ms": event.duration_ms}
        return self._end([*self._close_all(ts), RunFinishedEvent(
            thread_id=self.thread_id, run_id=self.run_id, usage=_usage(event.usage),
            timestamp=ts, metadata={META: meta},
        )])

    def _end(self, events: list[BaseEvent]) -> list[BaseEvent]:
        self.ended = True
        return events

    # -- closing what is open ----------------------------------------------------

    def _close_text(self, ts: int) -> list[BaseEvent]:
        if not self._text_open:
            return []
        self._text_open = False
        return [TextMessageEndEvent(message_id=self.message_id, timestamp=ts)]

    def _close_reasoning(self, ts: int) -> list[BaseEvent]:
        rid = self._reasoning
        if rid is None:
            return []
        self._reasoning = None
        return [ReasoningMessageEndEvent(message_id=rid, timestamp=ts), ReasoningEndEvent(message_id=rid, timestamp=ts)]

    def _close_open(self, ts: int) -> list[BaseEvent]:
        return [*self._close_text(ts), *self._close_reasoning(ts)]

    def _close_all(self, ts: int) -> list[BaseEvent]:
        out = self._close_open(ts)
        if self._step is not None:
            out.append(StepFinishedEvent(step_name=self._step, timestamp=ts))
            self._step = None
        return out


def _usage(usage: dict[str, Any]) -> list[TokenUsage] | None:
    """netra's token counts, in AG-UI's accounting; None when the model reported none
    (unknown is not zero)."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if prompt is None and completion is None:
        return None
    total = prompt + completion if prompt is not None and completion is not None else None
    return [TokenUsage(input_tokens=prompt, output_tokens=completion, total_tokens=total)]
