"""The scripted model: deterministic, offline, the embedded default.

It reads the last user message and follows its markers:

- ``[[tool:NAME {json args}]]`` calls tool NAME with those arguments, once per
  marker, in order, one call per model turn, before answering;
- ``[[stream:N]]`` streams the answer in N chunks;
- ``[[model:fail]]`` fails before streaming, ``[[model:fail_midstream]]``
  after the first chunk, ``[[model:stall]]`` stops sending after the first
  chunk (to exercise the idle timeout).

The answer names each tool's result or error, so a failed tool is visible in
what the user reads. Each streamed chunk waits ``delay_ms`` first.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from ..errors import LLMError
from .base import ChatMessage, ModelEvent, ModelRequest, Reasoning, TextChunk, ToolCallRequest, Usage

_TOOL = re.compile(r"\[\[tool:([A-Za-z_][\w.-]*)\s*(\{.*?\})?\s*\]\]", re.DOTALL)
_STREAM = re.compile(r"\[\[stream:(\d{1,5})\]\]")
_MODEL = re.compile(r"\[\[model:(fail|fail_midstream|stall)\]\]")
_ANY_MARKER = re.compile(r"\[\[(?:tool|stream|model):.*?\]\]", re.DOTALL)
_DEFAULT_CHUNKS = 4


@attrs.frozen(kw_only=True)
class ScriptedModel:
    """Stateless: everything it does follows from the request."""

    name: str = "scripted"
    delay_ms: float = 0.0

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        yield self._events(request)

    async def _events(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        user_index = max(i for i, m in enumerate(request.messages) if m.role == "user")
        text = request.messages[user_index].content or ""
        done = [m for m in request.messages[user_index + 1 :] if m.role == "tool"]
        markers = _TOOL.findall(text)
        directive = _MODEL.search(text)
        if directive and directive.group(1) == "fail":
            raise LLMError("scripted model failure")
        yield Reasoning(_plan(markers, len(done)))
        if len(done) < len(markers):
            name, raw_args = markers[len(done)]
            await self._pause()
            yield ToolCallRequest(
                id=f"call_{len(done) + 1}", name=name, arguments=raw_args or "{}"
            )
            yield Usage(prompt_tokens=_tokens(request.messages), completion_tokens=1)
            return
        stream = _STREAM.search(text)
        n = int(stream.group(1)) if stream else _DEFAULT_CHUNKS
        answer = _answer(text, done)
        if len(answer) < n:  # enough text for the chunks asked for
            answer += " streaming" * ((n - len(answer)) // 10 + 1)
        chunks = _split(answer, n)
        for i, chunk in enumerate(chunks):
            await self._pause()
            yield TextChunk(chunk)
            if i == 0 and directive is not None:
                if directive.group(1) == "fail_midstream":
                    raise LLMError("scripted model failed mid-stream")
                await trio.sleep_forever()  # stall
        yield Usage(prompt_tokens=_tokens(request.messages), completion_tokens=len(chunks))

    async def _pause(self) -> None:
        if self.delay_ms > 0:
            await trio.sleep(self.delay_ms / 1000)
        else:
            await trio.lowlevel.checkpoint()


def _plan(markers: list[tuple[str, str]], done: int) -> str:
    if done < len(markers):
        return f"I need the {markers[done][0]} tool (call {done + 1} of {len(markers)})."
    if markers:
        return "I have the tool results; writing the answer."
    return "Writing the answer."


def _answer(text: str, tool_messages: list[ChatMessage]) -> str:
    question = " ".join(_ANY_MARKER.sub(" ", text).split())
    parts = []
    for m in tool_messages:
        outcome = _describe(m.content or "")
        parts.append(f"{m.name} {outcome}")
    if parts:
        return f"Here is what I found for “{question[:200]}”: " + "; ".join(parts) + "."
    return f"You said: “{question[:500]}”. This is the scripted model's answer."


def _describe(content: str) -> str:
    try:
        value = json.loads(content)
    except ValueError:
        return f"returned {content[:200]}"
    if isinstance(value, dict) and set(value) == {"error"}:
        return f"failed: {str(value['error'])[:200]}"
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return f"returned {shown[:200]}"


def _split(answer: str, n: int) -> list[str]:
    """Split into ``n`` non-empty chunks (fewer if the text is shorter)."""
    n = max(1, min(n, len(answer)))
    size, extra = divmod(len(answer), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(answer[start:end])
        start = end
    return chunks


def _tokens(messages: tuple[ChatMessage, ...]) -> int:
    return sum(len((m.content or "").split()) for m in messages)
