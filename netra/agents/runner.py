"""The agent loop: ask the model, run the tools it asks for, ask again.

One :class:`AgentLoop` belongs to one run and dies with it. It emits the run's
progress events through ``emit`` and keeps what the run produced (answer text,
usage, tool calls) so that a run that fails or is cancelled can still record
its partial answer.

Failure is contained where it happens: a tool that raises, hangs past its
timeout, or gets bad arguments is a failed tool result the model sees (the
run goes on); a model failure ends the run with ``llm_error``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from .. import _json
from ..approvals import Decision, asks_approval
from ..errors import LLMError, NetraError, ToolError
from ..models.base import (
    ChatMessage,
    Model,
    ModelRequest,
    Reasoning,
    TextChunk,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from ..protocol import AgentThinking, RunEvent, TextDelta, ToolCompleted, ToolExecuting
from ..store.base import ToolCallRecord
from ..tools import Tool, ToolRegistry
from .definition import Agent

log = logging.getLogger("netra.agents")


class OutputTooLarge(NetraError):
    code = "too_large"


@attrs.frozen(kw_only=True)
class RunLimits:
    max_steps: int
    max_tool_calls: int
    tool_timeout_s: float
    first_chunk_timeout_s: float
    idle_timeout_s: float
    max_output_bytes: int
    max_tool_result_bytes: int
    #: How long a cancelled tool call may wait to report its tool_completed.
    cancel_emit_timeout_s: float = 1.0
    #: Sent with every model request of the run (max_tokens, temperature).
    model_options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(eq=False, kw_only=True)
class AgentLoop:
    run_id: str
    thread_id: str
    message_id: str
    agent: Agent
    model: Model
    tools: ToolRegistry
    #: What the model is told about ``tools`` (computed once per agent, not per turn).
    specs: tuple[ToolSpec, ...]
    limits: RunLimits
    #: The run's event sink: queues an event for the client, never blocks.
    emit: Callable[[RunEvent], None]
    model_limiter: trio.CapacityLimiter
    tool_limiters: Mapping[str, trio.CapacityLimiter]
    #: Observes each finished tool call (metrics); must not block.
    on_tool_call: Callable[[ToolCallRecord, str], None] = lambda record, outcome: None
    #: Observes each model turn (metrics): outcome (ok, error, timeout,
    #: cancelled), seconds to the first streamed event (None: there was
    #: none) and seconds to the end of the turn, both from the request
    #: (after the model limiter). Must not block.
    on_model_turn: Callable[[str, float | None, float], None] = lambda outcome, first, total: None
    #: Asks the user about a call that needs approval (tool call id, tool,
    #: the model's arguments) and waits for the decision; None: nobody can
    #: be asked, so such calls are refused (see netra.approvals).
    approve: Callable[[str, Tool, dict[str, Any]], Awaitable[Decision]] | None = None
    #: The run's own cancel scope, entered around :meth:`execute` by the
    #: caller: a model turn's deadlines (first chunk, idle) then move its
    #: deadline instead of entering a scope of their own (a scope costs
    #: several times a deadline move), and it goes back to ``run_deadline``
    #: after the turn. When that scope is cancelled by a model deadline,
    #: :attr:`model_timeout` says so and the caller reports an LLMError.
    #: None: each turn has its own scope.
    run_scope: trio.CancelScope | None = None
    run_deadline: float = math.inf
    #: The model deadline that cancelled ``run_scope`` (seconds), if one did.
    model_timeout: float | None = None

    text_parts: list[str] = attrs.field(factory=list)
    #: Token counts the model reported; None while it reported none (unknown,
    #: not zero: a provider that sends no usage must not look free).
    usage: dict[str, int | None] = attrs.field(factory=lambda: {"prompt_tokens": None, "completion_tokens": None})
    tool_calls: list[ToolCallRecord] = attrs.field(factory=list)
    _output_bytes: int = 0
    _announced_step: int = 0  # the last step an agent_thinking was sent for
    #: Arguments the user edited before approving, by call id, until the
    #: step's assistant message is rewritten with them.
    _edited: dict[str, str] = attrs.field(factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    async def execute(self, history: list[ChatMessage], user_text: str) -> str:
        """Run the loop to a final answer and return it."""
        messages = [
            ChatMessage(role="system", content=self.agent.instructions),
            *history,
            ChatMessage(role="user", content=user_text),
        ]
        specs = self.specs
        for step in range(1, self.limits.max_steps + 1):
            calls, turn_text = await self._model_turn(messages, specs, step)
            if not calls:
                return self.text
            messages.append(ChatMessage(role="assistant", content=turn_text or None, tool_calls=calls))
            results: dict[str, ChatMessage] = {}
            if len(calls) == 1:  # the common case needs no task of its own
                await self._tool_call(calls[0], results)
            else:
                async with trio.open_nursery() as nursery:
                    for call in calls:
                        nursery.start_soon(self._tool_call, call, results)
            if self.run_scope is not None:
                # a wait for the user's approval moved the run's deadline on by the wait
                self.run_deadline = self.run_scope.deadline
            if self._edited:  # the user changed some arguments: the model is told the calls that ran
                messages[-1] = attrs.evolve(messages[-1], tool_calls=tuple(
                    attrs.evolve(c, arguments=self._edited.pop(c.id, c.arguments)) for c in calls
                ))  # fmt: skip
            messages.extend(results[c.id] for c in calls)
        raise LLMError(f"the agent did not finish within {self.limits.max_steps} model steps")

    async def _model_turn(
        self, messages: list[ChatMessage], specs: tuple[Any, ...], step: int
    ) -> tuple[tuple[ToolCallRequest, ...], str]:
        request = ModelRequest(
            messages=tuple(messages), tools=specs, model=self.agent.model, options=self.limits.model_options
        )
        calls: list[ToolCallRequest] = []
        turn_text: list[str] = []
        timeout = self.limits.first_chunk_timeout_s
        # One scope for the whole turn. Its deadline is the model's: the first
        # chunk within first_chunk_timeout_s, then no silence longer than
        # idle_timeout_s. Moving a deadline costs a heap push, so it moves at
        # most once per 1% of the timeout: a silence is cut after 99-100% of it.
        started: float | None = None
        first: float | None = None
        outcome = "error"
        limiter = self.model_limiter
        run_scope, run_deadline = self.run_scope, self.run_deadline
        timed_out = False
        armed = math.inf
        try:
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                await limiter.acquire()
            try:
                started = now = trio.current_time()
                armed = now + timeout
                slack = timeout * 0.01
                # the turn's deadline: on the run's scope (the earlier of the
                # two wins), or on a scope of its own
                waiting = trio.CancelScope(deadline=armed) if run_scope is None else run_scope
                if run_scope is not None and armed < run_deadline:
                    run_scope.deadline = armed
                with waiting if run_scope is None else _NO_SCOPE:
                    async with self.model.stream(request) as events:
                        async for event in events:
                            now = trio.current_time()
                            if first is None:
                                first = now - started
                                timeout = self.limits.idle_timeout_s
                                slack = timeout * 0.01
                                armed = now + timeout
                                if armed < run_deadline or waiting.deadline != run_deadline:
                                    waiting.deadline = min(armed, run_deadline)
                            elif now + timeout - armed > slack:
                                armed = now + timeout
                                if armed < run_deadline or waiting.deadline != run_deadline:
                                    waiting.deadline = min(armed, run_deadline)
                            self._handle(event, step, calls, turn_text)
            finally:
                limiter.release()
            timed_out = waiting.cancelled_caught
            outcome = "timeout" if timed_out else "ok"
        except trio.Cancelled:
            # on the run's scope, a model deadline that passed (before the
            # run's own) is this turn timing out, whoever catches it
            if run_scope is not None and armed < run_deadline and run_scope.cancel_called \
                    and trio.current_time() >= armed:
                self.model_timeout = timeout
                outcome = "timeout"
            else:
                outcome = "cancelled"
            raise
        finally:
            if started is not None:
                self.on_model_turn(outcome, first, trio.current_time() - started)
        if timed_out:
            raise LLMError(f"the model sent nothing for {timeout:g}s")
        if run_scope is not None and calls and run_scope.deadline != run_deadline:
            run_scope.deadline = run_deadline  # tools run under the run's deadline only (a last turn keeps it)
        if self._announced_step != step:  # at least one agent_thinking per step
            self._announced_step = step
            self.emit(self._thinking("", step))
        return tuple(calls), "".join(turn_text)

    def _handle(
        self, event: object, step: int, calls: list[ToolCallRequest], turn_text: list[str]
    ) -> None:
        """One streamed model event: the step is announced before its first output."""
        match event:
            case Reasoning(text=text):
                self._announced_step = step
                self.emit(self._thinking(text, step))
            case TextChunk(text=text) if text:
                if self._announced_step != step:
                    self._announced_step = step
                    self.emit(self._thinking("", step))
                self._text(text)
                turn_text.append(text)
            case ToolCallRequest():
                calls.append(event)
            case Usage(prompt_tokens=p, completion_tokens=c):
                usage = self.usage
                usage["prompt_tokens"] = (usage["prompt_tokens"] or 0) + p
                usage["completion_tokens"] = (usage["completion_tokens"] or 0) + c

    def _thinking(self, text: str, step: int) -> AgentThinking:
        return AgentThinking(
            run_id=self.run_id, thread_id=self.thread_id, agent=self.agent.name, text=text, step=step
        )

    def _text(self, text: str) -> None:
        self._output_bytes += len(text.encode())
        if self._output_bytes > self.limits.max_output_bytes:
            raise OutputTooLarge(f"the answer exceeded {self.limits.max_output_bytes} bytes")
        self.text_parts.append(text)
        self.emit(
            TextDelta(run_id=self.run_id, thread_id=self.thread_id, message_id=self.message_id, delta=text)
        )

    async def _tool_call(self, call: ToolCallRequest, results: dict[str, ChatMessage]) -> None:
        """Run one tool call. Never raises (but for cancellation): every
        failure becomes a failed result, for the model and the client alike."""
        tool = self.tools.get(call.name)
        shown = (tool.label or call.name) if tool is not None else call.name  # what users see
        args: dict[str, Any] = {}
        error: str | None = None
        result: Any = None
        try:
            args = _json.loads(call.arguments or "{}")
            if not isinstance(args, dict):
                args = {"_raw": call.arguments[:1000]}
        except ValueError:
            args = {"_raw": call.arguments[:1000]}
        arguments = call.arguments
        refusal: str | None = None
        decision = await self._approval(call, tool, args) if tool is not None else None
        if decision is not None:  # the call waited for its user: it runs as they said
            if not decision.approved:
                refusal = decision.refusal()
            elif decision.args is not None:
                args, arguments = decision.args, _json.dumps_str(decision.args)
                self._edited[call.id] = arguments
        self.emit(
            ToolExecuting(
                run_id=self.run_id, thread_id=self.thread_id, tool_call_id=call.id, tool=shown, args=args
            )
        )
        started = time.monotonic()
        outcome = "ok"
        try:
            if tool is None:
                raise ToolError(f"unknown tool {call.name!r} for agent {self.agent.name!r}")
            if len(self.tool_calls) >= self.limits.max_tool_calls:
                raise ToolError(f"tool call limit of {self.limits.max_tool_calls} reached; answer now")
            if refusal is not None:
                outcome = "denied"
                raise ToolError(refusal)
            result = await self._invoke(tool, arguments)
        except trio.TooSlowError:
            outcome, error = "timeout", f"{call.name} timed out"
        except ToolError as exc:
            outcome, error = "denied" if outcome == "denied" else "error", exc.message
        except Exception as exc:  # a crashing tool is a failed call, seen only by its run
            log.warning("tool %s raised", call.name, exc_info=True, extra={"run_id": self.run_id})
            outcome, error = "error", f"{type(exc).__name__}: {exc}"[:1000]
        except trio.Cancelled:
            # the run is being cancelled: the call still gets its tool_completed
            # (bounded: on a gone or stuck connection the event is dropped)
            record = self._record(call, shown, args, None, "cancelled", started)
            self.tool_calls.append(record)
            self.on_tool_call(record, "cancelled")
            self.emit(self._completed(call, record))
            raise
        record = self._record(call, shown, args, result, error, started)
        self.tool_calls.append(record)
        self.on_tool_call(record, outcome)
        self.emit(self._completed(call, record))
        content = _json.dumps_str({"error": error} if error is not None else result)
        results[call.id] = ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name)

    async def _approval(self, call: ToolCallRequest, tool: Tool, args: dict[str, Any]) -> Decision | None:
        """The user's decision on this call, when it needs one (None: it
        does not). Asked before the call counts or runs, holding no model or
        tool slot. Calls that would fail anyway (arguments that do not fit,
        the call limit reached) fail without asking anyone."""
        rule = self.agent.approval_rule(tool)
        if rule is False or len(self.tool_calls) >= self.limits.max_tool_calls:
            return None
        try:
            checked = tool.parse_arguments(call.arguments)
        except ToolError:
            return None
        if not asks_approval(rule, checked):
            return None
        if self.approve is None:
            return Decision(approved=False, unasked=True, reason="it needs the user's approval and nobody can be asked")
        return await self.approve(call.id, tool, args)

    async def _invoke(self, tool: Tool, raw_arguments: str) -> Any:
        args = tool.parse_arguments(raw_arguments)
        timeout = tool.timeout_s if tool.timeout_s is not None else self.limits.tool_timeout_s
        limiter = self.tool_limiters.get(tool.name)
        if not tool.is_async and not tool.blocking and limiter is None:
            # runs inline, start to end, in this task: nothing to time out or wait for
            return _bounded(await tool.invoke(args), self.limits.max_tool_result_bytes)
        with trio.fail_after(timeout if math.isfinite(timeout) else math.inf):
            if limiter is None:
                result = await tool.invoke(args)
            else:
                try:
                    limiter.acquire_nowait()
                except trio.WouldBlock:
                    await limiter.acquire()
                try:
                    result = await tool.invoke(args)
                finally:
                    limiter.release()
        return _bounded(result, self.limits.max_tool_result_bytes)

    def _completed(self, call: ToolCallRequest, record: ToolCallRecord) -> ToolCompleted:
        return ToolCompleted(
            run_id=self.run_id,
            thread_id=self.thread_id,
            tool_call_id=call.id,
            tool=record.name,
            duration_ms=record.duration_ms,
            result=record.result,
            error=record.error,
        )

    def _record(
        self, call: ToolCallRequest, name: str, args: dict[str, Any], result: Any, error: str | None, started: float
    ) -> ToolCallRecord:
        return ToolCallRecord(
            id=call.id,
            run_id=self.run_id,
            name=name,
            args=args,
            result=result,
            error=error,
            duration_ms=round((time.monotonic() - started) * 1000),
        )


#: Stands for the turn's own scope when the turn uses the run's.
_NO_SCOPE = contextlib.nullcontext()


def _bounded(result: Any, limit: int) -> Any:
    """Keep a tool result JSON-serialisable and within ``limit`` bytes."""
    try:
        data = _json.dumps(result)
    except (TypeError, ValueError):
        result = str(result)
        data = _json.dumps(result)
    if len(data) <= limit:
        return _json.loads(data) if not isinstance(result, (str, int, float, bool, type(None), dict, list)) else result
    text = data.decode("utf-8", "replace")
    return {"truncated": True, "bytes": len(data), "preview": text[: min(limit, 4096)]}


def agent_tools(
    agent: Agent,
    registry: ToolRegistry,
    extra: tuple[str, ...] = (),
    *,
    elsewhere: Callable[[str], bool] = lambda name: False,
) -> ToolRegistry:
    """The tools one agent may call: its own plus ``extra`` (e.g. chaos tools).
    Names ``elsewhere`` claims are left to another source (``server.tool``:
    the MCP servers', listed only once the server runs)."""
    names = dict.fromkeys(n for n in (*agent.tool_names(), *extra) if not elsewhere(n))
    missing = [n for n in names if n not in registry]
    if missing:
        raise ValueError(f"agent {agent.name!r} names unknown tools: {', '.join(missing)}")
    strays = [n for n in agent.approvals if n not in (*agent.tool_names(), *extra)]
    if strays:
        raise ValueError(f"agent {agent.name!r} sets approvals for tools it does not have: {', '.join(strays)}")
    return ToolRegistry([registry[n] for n in names])
