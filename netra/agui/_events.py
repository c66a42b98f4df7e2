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

Pure: events in, ``ag_ui.core`` models out, no I/O, so every rule here can
be checked without a socket.
"""

from __future__ import annotations

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
from ..protocol import (
    AgentCancelled,
    AgentCompleted,
    AgentError,
    AgentStarted,
    AgentThinking,
    Error,
    RunQueued,
    TextDelta,
    ToolCompleted,
    ToolExecuting,
)

#: The metadata key of what only netra knows (AG-UI reserves ``ag-ui``).
META: Final = "netra"
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
    _text_open: bool = False
    _reasoning: str | None = None  # the open reasoning message
    _reasonings: int = 0
    _step: str | None = None  # the open step's name

    # -- what the stream asks for ---------------------------------------------

    def started(self, netra_run_id: str, agent: str, *, ts: int) -> list[BaseEvent]:
        """RUN_STARTED: the run was admitted (it may still wait its turn)."""
        self.netra_run_id, self.agent = netra_run_id, agent
        return [RunStartedEvent(
            thread_id=self.thread_id, run_id=self.run_id, protocol_version=PROTOCOL_VERSION,
            timestamp=ts, metadata={META: {"run_id": netra_run_id, "agent": agent}},
        )]

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
        name = f"step {step}"
        if name != self._step:
            out += self._close_open(ts)
            if self._step is not None:
                out.append(StepFinishedEvent(step_name=self._step, timestamp=ts))
            self._step = name
            out.append(StepStartedEvent(
                step_name=name, timestamp=ts, metadata={META: {"agent": self.agent, "step": step}},
            ))
        if text:
            out += self._close_text(ts)
            if self._reasoning is None:
                self._reasonings += 1
                self._reasoning = f"{self.netra_run_id}.thinking.{self._reasonings}"
                out.append(ReasoningStartEvent(message_id=self._reasoning, timestamp=ts))
                out.append(ReasoningMessageStartEvent(message_id=self._reasoning, role="reasoning", timestamp=ts))
            out.append(ReasoningMessageContentEvent(message_id=self._reasoning, delta=text, timestamp=ts))
        return out

    def _tool_call(self, event: ToolExecuting, ts: int) -> list[BaseEvent]:
        """A netra tool call starts with its arguments known: start, args and end at once."""
        call_id = self._call_id(event.tool_call_id)
        return [
            ToolCallStartEvent(
                tool_call_id=call_id, tool_call_name=event.tool,
                parent_message_id=self.message_id, timestamp=ts,
            ),
            ToolCallArgsEvent(tool_call_id=call_id, delta=_json.dumps_str(event.args), timestamp=ts),
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
        return ToolCallResultEvent(
            message_id=f"{call_id}.result", tool_call_id=call_id, content=content, role="tool",
            timestamp=ts, metadata={META: meta},
        )

    def _call_id(self, tool_call_id: str) -> str:
        return f"{self.netra_run_id}.{tool_call_id}"

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
