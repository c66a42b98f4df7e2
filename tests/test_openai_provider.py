"""The OpenAI-compatible provider against a scripted server in the test.

Most tests run a tiny HTTP/1.1 server on 127.0.0.1 (raw ``trio.serve_tcp``)
that plays one handler per request and records what it saw, so the real
httpx stack, sockets and connection closing are exercised. Those tests keep
their timeouts tiny (0.3 s) rather than sleeping. Long waits (Retry-After,
backoff, the default-sized timeouts) run on the ``autojump_clock`` with an
``httpx.MockTransport`` instead, because a virtual clock and real sockets do
not mix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio

from netra.errors import LLMError
from netra.models.base import (
    ChatMessage,
    Model,
    ModelEvent,
    ModelRequest,
    Reasoning,
    TextChunk,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from netra.models.openai import OpenAIModel, from_config

# An httpx/httpcore body iterator left un-finalised shows up as a
# ResourceWarning from trio's async-generator finaliser, reported by pytest as
# an unraisable exception: make exactly those failures here (narrowly, so
# garbage left by other test modules is not blamed on these tests).
_HTTPX_AGEN = r"(Response|BoundAsyncStream|AsyncResponseStream|PoolByteStream|HTTP11ConnectionByteStream|AsyncHTTP11Connection)\."
pytestmark = [
    pytest.mark.filterwarnings(r"error:Async generator 'http(x|core)\.:ResourceWarning"),
    pytest.mark.filterwarnings(
        rf"error:Exception ignored in. <async_generator object {_HTTPX_AGEN}:pytest.PytestUnraisableExceptionWarning"
    ),
]

KEY = "sk-test-SECRET-0123456789"
TIMEOUT = 5.0  # absolute bound on every real-socket test


# --------------------------------------------------------------------------
# the scripted server


@attrs.define
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@attrs.define(eq=False)
class Exchange:
    """One request on one connection; the handler answers through it."""

    stream: trio.SocketStream
    server: FakeServer
    request: Seen

    async def head(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """Start a chunked event-stream response."""
        hdrs = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked", **(headers or {})}
        await self._head(status, hdrs)

    async def _head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} X", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def raw(self, text: str) -> None:
        """Send ``text`` as one HTTP chunk."""
        data = text.encode()
        await self.stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))

    async def data(self, payload: Any) -> None:
        await self.raw("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n")

    async def end(self) -> None:
        await self.stream.send_all(b"0\r\n\r\n")

    async def respond(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        await self._head(status, {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})})
        await self.stream.send_all(data)

    async def wait_disconnect(self) -> None:
        """Block until the client drops the connection, and note when."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        self.server.disconnected_at = trio.current_time()
        self.server.disconnected.set()


Handler = Callable[[Exchange], Awaitable[None]]


@attrs.define(eq=False)
class FakeServer:
    handlers: list[Handler]
    requests: list[Seen] = attrs.field(factory=list)
    disconnected: trio.Event = attrs.field(factory=trio.Event)
    disconnected_at: float | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/"

    async def connection(self, stream: trio.SocketStream) -> None:
        try:
            seen = await read_request(stream)
            if seen is None:
                return
            index = len(self.requests)
            self.requests.append(seen)
            exchange = Exchange(stream, self, seen)
            if index >= len(self.handlers):
                await exchange.respond(418, {"error": {"message": "unexpected request"}})
                return
            await self.handlers[index](exchange)
        except trio.BrokenResourceError:
            self.disconnected.set()
        finally:
            await trio.aclose_forcefully(stream)


async def read_request(stream: trio.SocketStream) -> Seen | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode().split("\r\n")
    method, path, _ = request_line.split(" ")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        rest += data
    return Seen(method, path, headers, json.loads(rest) if rest else None, trio.current_time())


@asynccontextmanager
async def scenario(*handlers: Handler, **model_kw: Any) -> AsyncIterator[tuple[FakeServer, OpenAIModel]]:
    """A fake server playing ``handlers`` (one per request) and a provider
    pointed at it, both torn down at the end."""
    server = FakeServer(list(handlers))
    kw: dict[str, Any] = dict(
        api_key=KEY, model="test-model", max_retries=0, first_chunk_timeout_s=2.0,
        idle_timeout_s=2.0, backoff_base_s=0.01,
    )
    kw.update(model_kw)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(lambda task_status: trio.serve_tcp(server.connection, 0, host="127.0.0.1", task_status=task_status))
        server.port = listeners[0].socket.getsockname()[1]
        model = OpenAIModel(base_url=server.url, **kw)
        try:
            yield server, model
        finally:
            await model.aclose()
            nursery.cancel_scope.cancel()


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def call_piece(index: int, *, id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if id is not None:
        piece.update(id=id, type="function")
        piece["function"]["name"] = name
    return chunk(tool_calls=[piece])


USER = ModelRequest(messages=(ChatMessage(role="user", content="hi"),))


async def collect(model: Model, request: ModelRequest, into: list[ModelEvent] | None = None) -> list[ModelEvent]:
    out = [] if into is None else into
    async with model.stream(request) as events:
        async for event in events:
            out.append(event)
    return out


def assert_secret_free(err: LLMError) -> None:
    for text in (str(err), repr(err), err.message, repr(err.extra)):
        assert KEY not in text and "SECRET" not in text


# --------------------------------------------------------------------------
# streaming


async def test_text_streamed_in_chunks() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("", role="assistant"))
        for piece in ("Hel", "lo", ", world"):
            await ex.data(chunk(piece))
        await ex.data(chunk(finish="stop"))
        await ex.data(usage(12, 3))
        await ex.data("[DONE]")
        await ex.end()

    call = ToolCallRequest(id="call_0", name="clock", arguments="{}")
    request = ModelRequest(
        messages=(
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="time?"),
            ChatMessage(role="assistant", tool_calls=(call,)),
            ChatMessage(role="tool", content="12:00", tool_call_id="call_0", name="clock"),
            ChatMessage(role="user", content="thanks"),
        ),
        tools=(ToolSpec(name="clock", description="The time.", parameters={"type": "object", "properties": {}}),),
        options={"temperature": 0.2},
    )
    with trio.fail_after(TIMEOUT):
        async with scenario(handler, options={"max_tokens": 50, "temperature": 1.0}) as (server, model):
            assert isinstance(model, Model) and model.name == "openai"
            events = await collect(model, request)

    assert events == [TextChunk("Hel"), TextChunk("lo"), TextChunk(", world"), Usage(prompt_tokens=12, completion_tokens=3)]
    (seen,) = server.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.body == {
        "model": "test-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
        "temperature": 0.2,  # the request's options win over the provider's
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
            {"role": "tool", "content": "12:00", "tool_call_id": "call_0"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "clock", "description": "The time.", "parameters": {"type": "object", "properties": {}}}}],
    }


async def test_reasoning_and_sse_quirks() -> None:
    """Reasoning under either key; comments, ``event:``/``id:`` fields, no
    space after ``data:``, JSON split over two data lines, CRLF line ends,
    and a body that ends after ``finish_reason`` without ``[DONE]``."""

    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.raw(": keep-alive\n\n")
        await ex.raw("event: message\nid: 1\ndata:" + json.dumps(chunk(reasoning_content="think ")) + "\n\n")
        await ex.data(chunk(reasoning="more"))
        await ex.raw('data: {"choices": [{"index": 0,\r\ndata: "delta": {"content": "ok"}}]}\r\n\r\n')
        await ex.data(chunk(finish="stop"))
        await ex.end()

    with trio.fail_after(TIMEOUT):
        async with scenario(handler) as (server, model):
            events = await collect(model, ModelRequest(messages=USER.messages, model="other-model"))
    assert events == [Reasoning("think "), Reasoning("more"), TextChunk("ok")]
    assert server.requests[0].body["model"] == "other-model"
    assert "tools" not in server.requests[0].body


async def test_one_tool_call_with_arguments_in_pieces() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(call_piece(0, id="call_1", name="get_weather"))
        for piece in ('{"ci', 'ty": "Pa', 'ris"}'):
            await ex.data(call_piece(0, args=piece))
        await ex.data(chunk(finish="tool_calls"))
        await ex.data(usage(20, 9))
        await ex.data("[DONE]")
        await ex.end()

    with trio.fail_after(TIMEOUT):
        async with scenario(handler) as (_, model):
            events = await collect(model, USER)
    assert events == [
        ToolCallRequest(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
        Usage(prompt_tokens=20, completion_tokens=9),
    ]


async def test_parallel_tool_calls_interleaved() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("Checking both."))
        await ex.data(call_piece(1, id="call_b", name="lookup"))  # index 1 starts first
        await ex.data(call_piece(0, id="call_a", name="get_weather"))
        await ex.data(call_piece(1, args='{"q": '))
        await ex.data(call_piece(0, args='{"city"'))
        await ex.data(call_piece(1, args='"trio"}'))
        await ex.data(call_piece(0, args=': "Oslo"}'))
        await ex.data(call_piece(2, id="call_c", name="now"))  # no arguments at all
        await ex.data(chunk(finish="tool_calls"))
        await ex.data("[DONE]")
        await ex.end()

    with trio.fail_after(TIMEOUT):
        async with scenario(handler) as (_, model):
            events = await collect(model, USER)
    assert events == [
        TextChunk("Checking both."),
        ToolCallRequest(id="call_a", name="get_weather", arguments='{"city": "Oslo"}'),
        ToolCallRequest(id="call_b", name="lookup", arguments='{"q": "trio"}'),
        ToolCallRequest(id="call_c", name="now", arguments="{}"),
    ]


async def ok_handler(ex: Exchange) -> None:
    await ex.head()
    await ex.data(chunk("fine"))
    await ex.data(chunk(finish="stop"))
    await ex.data("[DONE]")
    await ex.end()


# --------------------------------------------------------------------------
# retries and errors


async def test_429_with_retry_after_then_success(caplog: pytest.LogCaptureFixture) -> None:
    async def limited(ex: Exchange) -> None:
        await ex.respond(429, {"error": {"type": "requests", "code": "rate_limit_exceeded"}}, {"Retry-After": "0.3"})

    caplog.set_level(logging.WARNING, "netra.models.openai")
    with trio.fail_after(TIMEOUT):
        async with scenario(limited, ok_handler, max_retries=2) as (server, model):
            events = await collect(model, USER)
    assert events == [TextChunk("fine")]
    assert len(server.requests) == 2
    assert server.requests[1].body == server.requests[0].body
    assert server.requests[1].at - server.requests[0].at >= 0.3
    assert "HTTP 429 (type=requests, code=rate_limit_exceeded); retry 1/2 in 0.30s" in caplog.text
    assert KEY not in caplog.text


async def test_5xx_and_early_disconnect_are_retried_until_max() -> None:
    async def unavailable(ex: Exchange) -> None:
        await ex.respond(503, {"error": {"message": "overloaded"}})

    async def drop_before_first_chunk(ex: Exchange) -> None:
        await ex.head()  # then close: nothing was streamed, so a retry is safe

    with trio.fail_after(TIMEOUT):
        async with scenario(unavailable, drop_before_first_chunk, ok_handler, max_retries=2) as (server, model):
            assert await collect(model, USER) == [TextChunk("fine")]
        assert len(server.requests) == 3

        async with scenario(*[unavailable] * 5, max_retries=2) as (server, model):
            with pytest.raises(LLMError, match="HTTP 503"):
                await collect(model, USER)
        assert len(server.requests) == 3  # one try and two retries


async def test_connect_error_is_retried_then_fails(caplog: pytest.LogCaptureFixture) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    caplog.set_level(logging.WARNING, "netra.models.openai")
    model = OpenAIModel(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, model="m", max_retries=2, backoff_base_s=0.01)
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(LLMError, match="ConnectError") as info:
            await collect(model, USER)
    finally:
        await model.aclose()
    assert_secret_free(info.value)
    assert "retry 2/2" in caplog.text


@pytest.mark.parametrize("how", ["error_event", "dropped"])
async def test_failure_after_first_chunk_is_not_retried(how: str) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("Hel"))
        if how == "error_event":
            await ex.data({"error": {"message": f"upstream failed for {KEY}", "type": "server_error", "code": 500}})
            await ex.end()
        # "dropped": close the connection in the middle of the chunked body

    got: list[ModelEvent] = []
    with trio.fail_after(TIMEOUT):
        async with scenario(handler, ok_handler, max_retries=3) as (server, model):
            with pytest.raises(LLMError) as info:
                await collect(model, USER, got)
    assert got == [TextChunk("Hel")]
    assert len(server.requests) == 1
    assert_secret_free(info.value)
    if how == "error_event":
        assert info.value.message == "openai: provider error in stream (type=server_error, code=500)"


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        "[1, 2]",
        '{"choices": "nope"}',
        '{"choices": [{"index": 0, "delta": {"content": 5}}]}',
        '{"choices": [{"index": 0, "delta": "text"}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "x"}]}}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, "finish_reason": "tool_calls"}]}',
        '{"choices": [], "usage": {"prompt_tokens": "many"}}',
        "[" * 100_000,
    ],
    ids=["json", "list", "choices", "content", "delta", "index", "nameless-call", "usage", "deep"],
)
async def test_malformed_chunk_is_llm_error(bad: str) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("ok"))
        await ex.data(bad)
        await ex.wait_disconnect()

    got: list[ModelEvent] = []
    with trio.fail_after(TIMEOUT):
        async with scenario(handler) as (server, model):
            with pytest.raises(LLMError, match="malformed stream chunk"):
                await collect(model, USER, got)
            with trio.fail_after(1):
                await server.disconnected.wait()
    assert got == [TextChunk("ok")]


async def test_401_fails_at_once_without_leaking_the_key() -> None:
    async def unauthorized(ex: Exchange) -> None:
        body = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error", "code": "invalid_api_key"}}
        await ex.respond(401, body)

    with trio.fail_after(TIMEOUT):
        async with scenario(unauthorized, ok_handler, max_retries=3) as (server, model):
            with pytest.raises(LLMError) as info:
                await collect(model, USER)
            assert KEY not in repr(model)
    assert len(server.requests) == 1
    assert info.value.message == "openai: HTTP 401 (type=invalid_request_error, code=invalid_api_key)"
    assert info.value.code == "llm_error"
    assert_secret_free(info.value)


# --------------------------------------------------------------------------
# timeouts (real sockets, tiny timeouts)


async def test_stall_after_one_chunk_hits_idle_timeout() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("Hel"))
        await ex.wait_disconnect()

    got: list[ModelEvent] = []
    with trio.fail_after(TIMEOUT):
        async with scenario(handler, ok_handler, idle_timeout_s=0.3, max_retries=2) as (server, model):
            start = trio.current_time()
            with pytest.raises(LLMError, match="idle timed out"):
                await collect(model, USER, got)
            assert trio.current_time() - start >= 0.3
            with trio.fail_after(1):
                await server.disconnected.wait()
    assert got == [TextChunk("Hel")]
    assert len(server.requests) == 1


@pytest.mark.parametrize("headers_sent", [True, False])
async def test_no_first_chunk_in_time(headers_sent: bool) -> None:
    async def handler(ex: Exchange) -> None:
        if headers_sent:
            await ex.head()
            await ex.raw(": still thinking\n\n")  # a comment is not a chunk
        await ex.wait_disconnect()

    with trio.fail_after(TIMEOUT):
        async with scenario(handler, ok_handler, first_chunk_timeout_s=0.3, idle_timeout_s=5, max_retries=2) as (server, model):
            start = trio.current_time()
            with pytest.raises(LLMError, match="first chunk timed out"):
                await collect(model, USER)
            assert trio.current_time() - start >= 0.3
            with trio.fail_after(1):
                await server.disconnected.wait()
    assert len(server.requests) == 1  # timeouts are not retried


# --------------------------------------------------------------------------
# cancellation


@pytest.mark.parametrize("where", ["reading", "in_body"])
async def test_cancelled_run_drops_the_connection(where: str) -> None:
    """Cancel the consuming scope while it waits on the next chunk
    ("reading") or while it is busy elsewhere inside the ``async with``
    ("in_body"); either way the server must see the connection drop."""

    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("Hel"))
        await ex.wait_disconnect()

    got: list[ModelEvent] = []
    first = trio.Event()

    async def consume(model: OpenAIModel) -> None:
        async with model.stream(USER) as events:
            async for event in events:
                got.append(event)
                first.set()
                if where == "in_body":
                    await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with scenario(handler) as (server, model):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, model)
                await first.wait()
                await trio.sleep(0.05)  # let the consumer block
                assert not server.disconnected.is_set()
                cancelled_at = trio.current_time()
                nursery.cancel_scope.cancel()
            with trio.fail_after(1):
                await server.disconnected.wait()
            assert server.disconnected_at is not None
            assert server.disconnected_at - cancelled_at < 0.5
    assert got == [TextChunk("Hel")]


async def test_leaving_early_drops_the_connection() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.head()
        await ex.data(chunk("Hel"))
        await ex.data(chunk("lo"))
        await ex.wait_disconnect()

    with trio.fail_after(TIMEOUT):
        async with scenario(handler) as (server, model):
            async with model.stream(USER) as events:
                async for event in events:
                    assert event == TextChunk("Hel")
                    break
            with trio.fail_after(1):
                await server.disconnected.wait()


# --------------------------------------------------------------------------
# long waits on a virtual clock (no sockets)


@attrs.define(eq=False)
class ScriptedBody(httpx.AsyncByteStream):
    """A response body of byte strings and pauses (floats, in seconds); a
    class, not a generator, so nothing is left un-finalised when closed."""

    parts: list[bytes | float]
    closed: bool = False

    def __aiter__(self) -> ScriptedBody:
        return self

    async def __anext__(self) -> bytes:
        while self.parts:
            part = self.parts.pop(0)
            if isinstance(part, float):
                await trio.sleep(part)
            else:
                return part
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


def sse(*payloads: Any) -> bytes:
    return b"".join(b"data: %s\n\n" % (p if isinstance(p, str) else json.dumps(p)).encode() for p in payloads)


@asynccontextmanager
async def mocked(responses: list[Callable[[], httpx.Response]], **model_kw: Any) -> AsyncIterator[tuple[list[float], OpenAIModel]]:
    times: list[float] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return responses[len(times) - 1]()

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        yield times, OpenAIModel(base_url="http://llm.invalid/v1", api_key=KEY, model="m", client=client, **model_kw)


def ok_response() -> httpx.Response:
    body = ScriptedBody([sse(chunk("fine"), chunk(finish="stop"), "[DONE]")])
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)


@pytest.mark.parametrize(("retry_after", "waited"), [("5", 5.0), ("3600", 20.0)])
async def test_retry_after_is_honoured_and_capped(autojump_clock: trio.abc.Clock, retry_after: str, waited: float) -> None:
    def limited() -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": retry_after}, json={})

    with trio.fail_after(600):
        async with mocked([limited, ok_response], max_retries=1) as (times, model):
            assert await collect(model, USER) == [TextChunk("fine")]
    assert times[1] - times[0] == pytest.approx(waited)


async def test_backoff_is_exponential_and_jittered(autojump_clock: trio.abc.Clock) -> None:
    def failing() -> httpx.Response:
        return httpx.Response(502, json={})

    with trio.fail_after(600):
        async with mocked([failing, failing, failing, ok_response], max_retries=3, backoff_base_s=1.0) as (times, model):
            assert await collect(model, USER) == [TextChunk("fine")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    for gap, full in zip(gaps, [1.0, 2.0, 4.0]):
        assert full / 2 <= gap <= full


async def test_default_sized_timeouts_on_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    bodies: list[ScriptedBody] = []

    def stalls_after_one() -> httpx.Response:
        bodies.append(ScriptedBody([sse(chunk("Hel")), 10_000.0]))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=bodies[-1])

    def never_starts() -> httpx.Response:
        bodies.append(ScriptedBody([10_000.0]))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=bodies[-1])

    with trio.fail_after(600):
        async with mocked([stalls_after_one, never_starts], first_chunk_timeout_s=60, idle_timeout_s=30) as (times, model):
            start = trio.current_time()
            with pytest.raises(LLMError, match="idle timed out"):
                await collect(model, USER)
            assert trio.current_time() - start == pytest.approx(30)
            start = trio.current_time()
            with pytest.raises(LLMError, match="first chunk timed out"):
                await collect(model, USER)
            assert trio.current_time() - start == pytest.approx(60)
    assert [b.closed for b in bodies] == [True, True]


async def test_a_json_answer_is_not_a_stream() -> None:
    """A server that ignores ``stream: true`` answers with one JSON body."""

    def whole() -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})

    with trio.fail_after(TIMEOUT):
        async with mocked([whole]) as (_, model):
            with pytest.raises(LLMError, match="expected an event stream"):
                await collect(model, USER)


# --------------------------------------------------------------------------
# construction


async def test_from_config_and_ownership() -> None:
    from netra.config import Config

    config = Config(openai_base_url="http://x.invalid/v1", openai_api_key=KEY, openai_model="gpt-x",
                    openai_max_retries=5, model_first_chunk_timeout_s=7.0, model_idle_timeout_s=3.0)
    model = from_config(config)
    try:
        assert (model.base_url, model.api_key, model.model, model.max_retries) == ("http://x.invalid/v1", KEY, "gpt-x", 5)
        assert (model.first_chunk_timeout_s, model.idle_timeout_s) == (7.0, 3.0)
        assert KEY not in repr(model)
    finally:
        await model.aclose()
    assert model.client is not None and model.client.is_closed

    bad = OpenAIModel(base_url="no-scheme", model="m", api_key=KEY)
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(LLMError, match="UnsupportedProtocol") as info:
            await collect(bad, USER)
        assert_secret_free(info.value)
    finally:
        await bad.aclose()

    async with httpx.AsyncClient() as client:
        injected = OpenAIModel(base_url="http://x.invalid", model="m", client=client)
        await injected.aclose()
        assert not client.is_closed  # an injected client belongs to its owner
