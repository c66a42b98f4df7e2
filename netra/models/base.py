"""The model interface: what every LLM provider implements.

A model turns a request (the conversation so far and the tools it may call)
into a stream of :data:`ModelEvent` values: text chunks, optional reasoning,
complete tool calls (arguments assembled from however many pieces the
provider sent), and usage. The agent runner owns the loop around it: it runs
the tool calls and asks the model again, until a turn ends with no tool call.

A stream is an async context manager so that leaving it, normally or by
cancellation, closes whatever the provider holds open (an HTTP stream) at
once::

    async with model.stream(request) as events:
        async for event in events:
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

Role = Literal["system", "user", "assistant", "tool"]


@attrs.frozen(kw_only=True)
class ToolCallRequest:
    """A complete tool call asked for by the model. ``arguments`` is the raw
    JSON text the model produced: the runner parses and validates it, so a
    malformed call becomes a failed tool result the model sees, not a crash."""

    id: str
    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class ChatMessage:
    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None  # role == "tool": the call this answers
    name: str | None = None  # role == "tool": the tool's name


@attrs.frozen(kw_only=True)
class ToolSpec:
    """What the model is told about a tool: name, description, JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]


@attrs.frozen(kw_only=True)
class ModelRequest:
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    #: Provider-specific model name (None: the provider's default).
    model: str | None = None
    #: Extra request options (temperature, max_tokens, ...), passed through.
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class TextChunk:
    text: str


@attrs.frozen
class Reasoning:
    """Reasoning the model chose to show; becomes ``agent_thinking``."""

    text: str


@attrs.frozen(kw_only=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


ModelEvent = TextChunk | Reasoning | ToolCallRequest | Usage


@runtime_checkable
class Model(Protocol):
    """An LLM provider. Implementations must be safe to use from many runs at
    once: per-call state lives inside ``stream``, never on the instance."""

    #: Short provider name (``scripted``, ``openai``), used for per-provider limits and metrics.
    name: str

    def stream(self, request: ModelRequest) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        """Stream one model turn. Raises :class:`netra.errors.LLMError` for
        provider failures; timeouts are enforced by the caller."""
        ...
