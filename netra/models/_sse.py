"""Parsing an OpenAI-compatible Chat Completions event stream.

Two pure, synchronous pieces, kept apart from the HTTP code so they hold no
I/O and no async generators (nothing here can be left un-finalised under a
cancelled trio scope), and so each can be reasoned about on its own:

* :class:`SSEDecoder` turns lines of a ``text/event-stream`` body into
  events, following the WHATWG rules closely enough for what LLM providers
  send (``data:`` fields joined by newlines, comments and unknown fields
  ignored, a blank line ends an event).
* :class:`ChunkAssembler` turns the JSON chunks of one model turn into
  :data:`~netra.models.base.ModelEvent` values. Tool calls arrive in pieces,
  keyed by ``index`` and possibly interleaved, so they are only emitted once
  the turn ends, complete.

Every way a provider can send something unexpected ends in
:class:`~netra.errors.LLMError`, never in ``KeyError``/``TypeError``: a
provider's bug must fail the run cleanly, not look like a bug in netra.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from netra.errors import LLMError
from netra.models.base import ModelEvent, Reasoning, TextChunk, ToolCallRequest, Usage


@attrs.frozen
class SSEEvent:
    #: The ``event:`` field ("" when absent, which means ``message``).
    event: str
    data: str


@attrs.define
class SSEDecoder:
    """Line-at-a-time SSE decoder; ``feed`` returns an event when one ends."""

    _data: list[str] = attrs.field(factory=list)
    _event: str = ""
    _first: bool = True

    def feed(self, line: str) -> SSEEvent | None:
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment (keep-alive)
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        # id, retry and unknown fields mean nothing for a one-shot stream.
        return None

    def flush(self) -> SSEEvent | None:
        """At end of body: dispatch a last event that lacked its blank line.
        The spec would drop it; providers that end on ``data: [DONE]`` without
        one are common enough that leniency is the better failure mode."""
        return self._dispatch()

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(event=event, data="\n".join(data))


def malformed(what: str) -> LLMError:
    return LLMError(f"openai: malformed stream chunk ({what})")


_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def error_detail(payload: Any) -> str:
    """A short, safe description of a provider's ``{"error": {...}}``: only
    its ``type`` and ``code``. The ``message`` is left out on purpose: some
    providers echo (part of) the API key or the prompt in it."""
    err = payload.get("error", payload) if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return ""
    parts = []
    for key in ("type", "code"):
        value = err.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            text = _SAFE.sub("", str(value))[:64]
            if text:
                parts.append(f"{key}={text}")
    return (" (" + ", ".join(parts) + ")") if parts else ""


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise malformed(f"{what} is not an object")
    return value


def _opt_str(obj: dict[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise malformed(f"{what}.{key} is not a string")


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise malformed(f"usage.{key} is not a count")
    return value


@attrs.define
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = attrs.field(factory=list)


@attrs.define
class ChunkAssembler:
    """State of one model turn: partial tool calls, the last usage seen,
    whether the turn finished. One per attempt, never shared."""

    _calls: dict[int, _PartialCall] = attrs.field(factory=dict)
    _usage: Usage | None = None
    #: A choice carried a ``finish_reason``: the turn is complete even if the
    #: body ends without ``[DONE]``.
    finished: bool = False

    def feed(self, chunk: Any) -> list[ModelEvent]:
        """Events from one decoded JSON chunk, in the order they arrived."""
        chunk = _dict(chunk, "chunk")
        if "error" in chunk and chunk["error"] is not None:
            raise LLMError(f"openai: provider error in stream{error_detail(chunk)}")
        out: list[ModelEvent] = []
        usage = chunk.get("usage")
        if usage is not None:
            usage = _dict(usage, "usage")
            # Some providers repeat (cumulative) usage on every chunk: keep
            # the last and report it once, at the end of the turn.
            self._usage = Usage(
                prompt_tokens=_count(usage, "prompt_tokens"),
                completion_tokens=_count(usage, "completion_tokens"),
            )
        choices = chunk.get("choices")
        if choices is None:
            return out
        if not isinstance(choices, list):
            raise malformed("choices is not a list")
        for raw in choices:
            choice = _dict(raw, "choice")
            if choice.get("index") not in (None, 0):
                continue  # only one completion is ever asked for
            delta = choice.get("delta")
            if delta is not None:
                self._delta(_dict(delta, "delta"), out)
            if choice.get("finish_reason") is not None:
                self.finished = True
                out.extend(self._take_calls())
        return out

    def finish(self) -> list[ModelEvent]:
        """Events still owed when the stream ends: calls not yet emitted,
        then usage."""
        out = self._take_calls()
        if self._usage is not None:
            out.append(self._usage)
            self._usage = None
        return out

    def _delta(self, delta: dict[str, Any], out: list[ModelEvent]) -> None:
        for key in ("reasoning_content", "reasoning"):
            text = _opt_str(delta, key, "delta")
            if text:
                out.append(Reasoning(text))
        text = _opt_str(delta, "content", "delta")
        if text:
            out.append(TextChunk(text))
        calls = delta.get("tool_calls")
        if calls is None:
            return
        if not isinstance(calls, list):
            raise malformed("delta.tool_calls is not a list")
        for raw in calls:
            self._call_piece(_dict(raw, "tool call"))

    def _call_piece(self, piece: dict[str, Any]) -> None:
        call_id = _opt_str(piece, "id", "tool call")
        index = piece.get("index")
        if index is None:
            # Not all "compatible" servers send index: a new id starts a new
            # call, anything else continues the latest one.
            if call_id or not self._calls:
                index = len(self._calls)
            else:
                index = max(self._calls)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise malformed("tool call index is not a number")
        call = self._calls.setdefault(index, _PartialCall())
        if call_id:
            call.id = call_id
        fn = piece.get("function")
        if fn is None:
            return
        fn = _dict(fn, "tool call function")
        name = _opt_str(fn, "name", "function")
        if name:
            call.name = name
        arguments = _opt_str(fn, "arguments", "function")
        if arguments:
            call.arguments.append(arguments)

    def _take_calls(self) -> list[ModelEvent]:
        out: list[ModelEvent] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.id or not call.name:
                raise malformed(f"tool call {index} has no id or name")
            # No arguments at all means "no arguments"; the runner parses the
            # text, so give it valid JSON for that case.
            out.append(ToolCallRequest(id=call.id, name=call.name, arguments="".join(call.arguments) or "{}"))
        self._calls.clear()
        return out
