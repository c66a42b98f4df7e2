"""The scripted model: deterministic, offline, the embedded default.

It reads the last user message and follows its markers:

- ``[[tool:NAME {json args}]]`` calls tool NAME with those arguments, once per
  marker, in order, one call per model turn, before answering;
- ``[[stream:N]]`` streams the answer in N chunks;
- ``[[model:fail]]`` fails before streaming, ``[[model:fail_midstream]]``
  after the first chunk, ``[[model:stall]]`` stops sending after the first
  chunk (to exercise the idle timeout).

The answer names each tool's result or error, so a failed tool is visible in
what the user reads. Each streamed chunk waits ``delay_ms`` first; with no
delay the output is all there at once, as a fast provider's buffered stream
would be, and the model lets other tasks run only every
``_CHUNKS_PER_CHECKPOINT`` chunks (so a huge answer cannot hold the loop).
"""

from __future__ import annotations

import json
import re

import attrs
import trio

from ..errors import LLMError
from .base import ChatMessage, ModelEvent, ModelRequest, Reasoning, TextChunk, ToolCallRequest, Usage

_TOOL = re.compile(r"\[\[tool:([A-Za-z_][\w.-]*)\s*(\{.*?\})?\s*\]\]", re.DOTALL)
_STREAM = re.compile(r"\[\[stream:(\d{1,5})\]\]")
_MODEL = re.compile(r"\[\[model:(fail|fail_midstream|stall)\]\]")
_ANY_MARKER = re.compile(r"\[\[(?:tool|stream|model):.*?\]\]", re.DOTALL)
_DEFAULT_CHUNKS = 4
#: With no delay, the model lets other tasks run once per this many chunks.
_CHUNKS_PER_CHECKPOINT = 16


@attrs.frozen(kw_only=True)
class ScriptedModel:
    """Stateless: everything it does follows from the request."""

    name: str = "scripted"
    delay_ms: float = 0.0

    def stream(self, request: ModelRequest) -> _Stream:
        return _Stream(self.delay_ms, request)


#: Steps of a scripted turn besides the events themselves.
_PAUSE, _FAIL_MIDSTREAM, _STALL = object(), object(), object()


class _Stream:
    """One scripted turn: an async context manager that is its own async
    iterator. A plain class rather than async generators: a run makes two
    turns, and each async generator costs the event loop's hooks."""

    __slots__ = ("_delay_s", "_steps", "_i", "_chunks")

    def __init__(self, delay_ms: float, request: ModelRequest) -> None:
        self._delay_s = delay_ms / 1000
        self._steps = _script(request)
        self._i = 0
        self._chunks = 0

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> ModelEvent:
        steps = self._steps
        while self._i < len(steps):
            step = steps[self._i]
            self._i += 1
            if step is _PAUSE:
                if self._delay_s > 0:
                    await trio.sleep(self._delay_s)
                else:
                    # no delay: all there at once, but let others run now and then
                    self._chunks += 1
                    if self._chunks % _CHUNKS_PER_CHECKPOINT == 0:
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.lowlevel.checkpoint_if_cancelled()
            elif step is _FAIL_MIDSTREAM:
                raise LLMError("scripted model failed mid-stream")
            elif step is _STALL:
                await trio.sleep_forever()
            elif isinstance(step, LLMError):
                raise step
            else:
                return step  # type: ignore[return-value]
        raise StopAsyncIteration


def _script(request: ModelRequest) -> list[object]:
    """The turn's steps, in order: events, pauses, failures."""
    messages = request.messages
    user_index = len(messages) - 1
    while user_index > 0 and messages[user_index].role != "user":
        user_index -= 1
    text = messages[user_index].content or ""
    done = [m for m in messages[user_index + 1:] if m.role == "tool"]
    markers = _TOOL.findall(text) if "[[" in text else []
    directive = _MODEL.search(text) if "[[" in text else None
    if directive and directive.group(1) == "fail":
        return [LLMError("scripted model failure")]
    steps: list[object] = [Reasoning(_plan(markers, len(done)))]
    if len(done) < len(markers):
        name, raw_args = markers[len(done)]
        steps += [
            _PAUSE,
            ToolCallRequest(id=f"call_{len(done) + 1}", name=name, arguments=raw_args or "{}"),
            Usage(prompt_tokens=_tokens(messages), completion_tokens=1),
        ]
        return steps
    stream = _STREAM.search(text) if "[[" in text else None
    n = int(stream.group(1)) if stream else _DEFAULT_CHUNKS
    answer = _answer(text, done)
    if len(answer) < n:  # enough text for the chunks asked for
        answer += " streaming" * ((n - len(answer)) // 10 + 1)
    chunks = _split(answer, n)
    for i, chunk in enumerate(chunks):
        steps += [_PAUSE, TextChunk(chunk)]
        if i == 0 and directive is not None:
            steps.append(_FAIL_MIDSTREAM if directive.group(1) == "fail_midstream" else _STALL)
            return steps
    steps.append(Usage(prompt_tokens=_tokens(messages), completion_tokens=len(chunks)))
    return steps


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
    digits = content[1:] if content[:1] == "-" else content
    try:
        if digits.isascii() and digits.isdigit() and (digits[0] != "0" or len(digits) == 1):
            value: object = int(content)  # what json.loads makes of an integer, at a fraction of its cost
        else:
            value = json.loads(content)
    except ValueError:
        return f"returned {content[:200]}"
    if isinstance(value, dict) and set(value) == {"error"}:
        return f"failed: {str(value['error'])[:200]}"
    if type(value) is int:  # as json.dumps writes it, without building an encoder (most tool results)
        shown = int.__repr__(value)
    else:
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
    n = 0
    for m in messages:
        if m.content:
            n += len(m.content.split())
    return n
