"""The OpenAI-compatible Chat Completions provider.

Speaks ``POST {base_url}/chat/completions`` with ``stream: true`` over an
``httpx.AsyncClient`` (httpx runs on trio through anyio), so it works with
OpenAI and with the many servers that copy its API (vLLM, llama.cpp,
Ollama, OpenRouter, ...).

Why it is shaped the way it is:

* The stream of one call is a plain class (:class:`_Turn`) with
  ``__aenter__``/``__anext__``, not an async generator: under trio, a
  generator abandoned mid-iteration is finalised late and outside the scope
  that owned it. Leaving the ``async with`` closes the HTTP response at once,
  shielded, so a cancelled run drops its connection and the provider stops
  generating (and billing).
* Retries happen only before the first chunk, while nothing has been handed
  to the caller, so a retry is invisible; after that a failure is final.
* Timeouts are trio deadlines around our own awaits (first chunk, then the
  silence between chunks), so they hold whatever client was injected.
* Every httpx exception becomes :class:`~netra.errors.LLMError` in
  :func:`_translate`; messages never carry the API key or a response body.
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import httpx
import trio

from netra.errors import LLMError
from netra.models._sse import ChunkAssembler, SSEDecoder, SSEEvent, error_detail, malformed
from netra.models.base import ChatMessage, ModelEvent, ModelRequest

if TYPE_CHECKING:
    from netra.config import Config

logger = logging.getLogger(__name__)

#: Longest time a shielded close may take; closing a socket is immediate, a
#: TLS close may try to write, and a dead peer must not hold a cancelled run.
_CLOSE_TIMEOUT_S = 2.0
#: Bytes of an error response read to find its ``error.type``/``code``.
_ERROR_BODY_LIMIT = 65536
#: Everything httpx raises for a failed request (InvalidURL and StreamError
#: are not HTTPError subclasses).
_HTTPX_ERRORS = (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL)


class _Transient(LLMError):
    """A failure worth retrying if nothing has been streamed yet (connect
    errors, 429, 5xx). Still an LLMError if it escapes after the last try."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _translate(exc: Exception, api_key: str | None, *, transient: bool) -> LLMError:
    """The one place an httpx exception becomes an LLMError. Network-level
    failures are :class:`_Transient` when ``transient`` (before the first
    chunk), otherwise final."""
    if isinstance(exc, httpx.TimeoutException):
        return LLMError(f"openai: request timed out ({type(exc).__name__})")
    text = str(exc)
    if api_key:
        text = text.replace(api_key, "***")
    message = f"openai: {type(exc).__name__}: {text[:200]}".rstrip(": ")
    if transient and isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        return _Transient(message)
    return LLMError(message)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms`` (OpenAI) or
    ``Retry-After`` in seconds. HTTP dates are not honoured (None: back off)."""
    for key, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(key)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0 and seconds == seconds and seconds != float("inf"):
            return seconds
    return None


def _message(m: ChatMessage) -> dict[str, Any]:
    """One ChatMessage in the Chat Completions wire shape."""
    if m.role == "tool":
        out: dict[str, Any] = {"role": "tool", "content": m.content or ""}
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        return out
    if m.role == "assistant" and m.tool_calls:
        return {
            "role": "assistant",
            "content": m.content,
            "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ],
        }
    return {"role": m.role, "content": m.content or ""}


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.define(eq=False)
class OpenAIModel:
    """An OpenAI-compatible provider. Holds configuration and one HTTP client
    (shared connection pool); every call's state lives in its :class:`_Turn`,
    so one instance serves any number of runs at once."""

    name: ClassVar[str] = "openai"

    base_url: str = attrs.field(kw_only=True)
    api_key: str | None = attrs.field(kw_only=True, default=None, repr=False)
    model: str = attrs.field(kw_only=True)
    max_retries: int = attrs.field(kw_only=True, default=3, validator=attrs.validators.ge(0))
    first_chunk_timeout_s: float = attrs.field(kw_only=True, default=60.0, validator=_positive)
    idle_timeout_s: float = attrs.field(kw_only=True, default=30.0, validator=_positive)
    #: Passed through into every request body (temperature, max_tokens, ...);
    #: a request's own options win over these.
    options: dict[str, Any] = attrs.field(kw_only=True, factory=dict)
    client: httpx.AsyncClient | None = attrs.field(kw_only=True, default=None, repr=False)
    #: Exponential backoff: first delay, and the most any delay may be.
    backoff_base_s: float = attrs.field(kw_only=True, default=0.5)
    backoff_max_s: float = attrs.field(kw_only=True, default=8.0)
    #: A server's Retry-After is honoured up to this many seconds.
    retry_after_cap_s: float = attrs.field(kw_only=True, default=20.0)
    _owns_client: bool = attrs.field(init=False, default=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.client is None:
            # Our trio deadlines bound reads; httpx only bounds connect and
            # write. No pool limit: max_model_calls bounds concurrency, and
            # waiting in a pool would eat into the first-chunk deadline.
            # trust_env=False: nothing but Config reads the environment
            # (inject a client to use a proxy).
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=min(self.first_chunk_timeout_s, 30.0), read=None, write=30.0, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                trust_env=False,
            )
            self._owns_client = True

    async def aclose(self) -> None:
        """Close the HTTP client if this model created it (an injected one
        belongs to whoever injected it)."""
        if self._owns_client and self.client is not None:
            await self.client.aclose()

    def stream(self, request: ModelRequest) -> _Turn:
        body: dict[str, Any] = {**self.options, **request.options}
        body.update(
            model=request.model or self.model,
            messages=[_message(m) for m in request.messages],
            stream=True,
            stream_options={"include_usage": True},
        )
        if request.tools:
            body["tools"] = [
                {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
                for t in request.tools
            ]
        return _Turn(model=self, body=body)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Delay before retry number ``attempt + 1``: the server's Retry-After
        (capped) when given, else jittered exponential backoff ("equal
        jitter": half fixed, half random, so retries spread out but still
        wait)."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap_s)
        delay = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return delay / 2 + random.uniform(0, delay / 2)


def from_config(config: Config) -> OpenAIModel:
    """The provider ``netra serve`` uses when ``model = "openai"``: settings
    come only from Config (which alone reads the environment)."""
    return OpenAIModel(
        base_url=config.openai_base_url,
        api_key=config.openai_api_key,
        model=config.openai_model,
        max_retries=config.openai_max_retries,
        first_chunk_timeout_s=config.model_first_chunk_timeout_s,
        idle_timeout_s=config.model_idle_timeout_s,
    )


@attrs.define(eq=False)
class _Turn:
    """One streamed model turn: an async context manager that is its own
    async iterator. ``__aenter__`` connects (retrying) and waits for the first
    chunk; ``__anext__`` reads on; ``__aexit__`` closes the response."""

    _model: OpenAIModel = attrs.field(alias="model")
    _body: dict[str, Any] = attrs.field(alias="body")
    _response: httpx.Response | None = None
    #: The body iterator being read (lines, or an error's bytes).
    _reader: AsyncGenerator[Any] | None = None
    _decoder: SSEDecoder = attrs.field(factory=SSEDecoder)
    _chunks: ChunkAssembler = attrs.field(factory=ChunkAssembler)
    _pending: deque[ModelEvent] = attrs.field(factory=deque)
    _done: bool = False
    _entered: bool = False

    async def __aenter__(self) -> _Turn:
        if self._entered:
            raise RuntimeError("a model stream can be entered only once")
        self._entered = True
        try:
            await self._connect()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    def __aiter__(self) -> _Turn:
        return self

    async def __anext__(self) -> ModelEvent:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            await self._read_event(trio.current_time() + self._model.idle_timeout_s, "idle", transient=False)
        return self._pending.popleft()

    async def _connect(self) -> None:
        """Send, check the status and read the first chunk, retrying
        transient failures; each attempt gets the whole first-chunk time."""
        model = self._model
        attempt = 0
        while True:
            deadline = trio.current_time() + model.first_chunk_timeout_s
            self._decoder, self._chunks = SSEDecoder(), ChunkAssembler()
            try:
                await self._open(deadline)
                await self._read_event(deadline, "first chunk", transient=True)
                return
            except _Transient as exc:
                await self._close()
                if attempt >= model.max_retries:
                    raise
                delay = model.backoff(attempt, exc.retry_after)
                attempt += 1
                logger.warning("%s; retry %d/%d in %.2fs", exc.message, attempt, model.max_retries, delay)
                await trio.sleep(delay)

    async def _open(self, deadline: float) -> None:
        model = self._model
        assert model.client is not None
        headers = {"Accept": "text/event-stream"}
        if model.api_key:
            headers["Authorization"] = f"Bearer {model.api_key}"
        try:
            request = model.client.build_request(
                "POST", model.base_url.rstrip("/") + "/chat/completions", json=self._body, headers=headers
            )
            with trio.fail_at(deadline):
                self._response = await model.client.send(request, stream=True)
        except trio.TooSlowError:
            raise LLMError("openai: first chunk timed out (no response)") from None
        except _HTTPX_ERRORS as exc:
            raise _translate(exc, model.api_key, transient=True) from exc
        response = self._response
        status = response.status_code
        if not 200 <= status < 300:
            detail = await self._error_detail(response, deadline)
            message = f"openai: HTTP {status}{detail}"
            if status == 429 or status >= 500:
                raise _Transient(message, retry_after=_retry_after(response.headers))
            raise LLMError(message)
        if response.headers.get("content-type", "").startswith("application/json"):
            # The server ignored ``stream: true``. Other types are let through:
            # "compatible" servers label event streams in creative ways.
            raise LLMError("openai: expected an event stream, got application/json")
        self._reader = response.aiter_lines()

    async def _error_detail(self, response: httpx.Response, deadline: float) -> str:
        """``error.type``/``code`` of an error body, best effort and bounded
        in both time and size."""
        body = bytearray()
        self._reader = pieces = response.aiter_bytes()  # so _close finalises it
        with trio.move_on_at(min(deadline, trio.current_time() + 5.0)):
            try:
                async for piece in pieces:
                    body += piece
                    if len(body) > _ERROR_BODY_LIMIT:
                        return ""
            except _HTTPX_ERRORS:
                return ""
        try:
            return error_detail(json.loads(body))
        except (ValueError, RecursionError):
            return ""

    async def _read_event(self, deadline: float, what: str, *, transient: bool) -> None:
        """Read lines until one SSE event has been handled or the body ends."""
        lines = self._reader
        if lines is None:
            raise LLMError("openai: the stream is closed")
        try:
            with trio.fail_at(deadline):
                while True:
                    try:
                        line = await anext(lines)
                    except StopAsyncIteration:
                        self._end_of_body()
                        return
                    event = self._decoder.feed(line)
                    if event is not None:
                        self._handle(event)
                        return
        except trio.TooSlowError:
            raise LLMError(f"openai: {what} timed out") from None
        except _HTTPX_ERRORS as exc:
            raise _translate(exc, self._model.api_key, transient=transient) from exc

    def _end_of_body(self) -> None:
        last = self._decoder.flush()
        if last is not None:
            self._handle(last)
        if not self._done:
            if not self._chunks.finished:
                raise LLMError("openai: stream ended before the turn finished")
            self._finish()

    def _handle(self, event: SSEEvent) -> None:
        if self._done:
            return  # anything after [DONE] is ignored
        if event.data.strip() == "[DONE]":
            self._finish()
            return
        try:
            chunk = json.loads(event.data)
        except (ValueError, RecursionError):
            raise malformed("not JSON") from None
        if event.event == "error":
            raise LLMError(f"openai: provider error in stream{error_detail(chunk)}")
        self._pending.extend(self._chunks.feed(chunk))

    def _finish(self) -> None:
        self._pending.extend(self._chunks.finish())
        self._done = True

    async def _close(self) -> None:
        """Finalise the body iterator and close the response, shielded: this
        runs while a cancelled scope unwinds, and must still reach the socket.

        httpx's body iterators are a stack of async generators (aiter_lines
        down to httpcore's). ``aclose()`` on the outer one would only close
        that one and leave the rest to the garbage collector; instead it is
        resumed under an already-cancelled scope, so ``Cancelled`` rises from
        the innermost read through every layer, finishing each one (httpcore
        closes the connection on the way)."""
        reader, self._reader = self._reader, None
        response, self._response = self._response, None
        with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            try:
                if reader is not None:
                    with trio.CancelScope() as drain:
                        drain.cancel()
                        while True:
                            await anext(reader)  # lines already buffered, then Cancelled
            except (StopAsyncIteration, *_HTTPX_ERRORS):
                pass
            try:
                if response is not None:
                    await response.aclose()
            except _HTTPX_ERRORS:
                logger.debug("openai: error while closing a response", exc_info=True)
