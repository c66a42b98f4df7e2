"""The whole server on the OpenAI-compatible provider, against a fake
OpenAI server the test runs on loopback.

What the unit tests of the provider cannot show: that a real run drives it
correctly. A tool call streamed in pieces becomes one ``tool_executing`` with
the assembled arguments, its result goes back to the model as a ``tool``
message, usage reaches ``agent_completed``, the agent's own model name is
what the server asks for, the model routes a message through
``route_to_agent`` (emitting nothing of its own), and a client's cancel
closes the HTTP stream so the provider stops generating.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from netra.agents import Agent, AgentSet, builtin_agents
from netra.client import connect
from netra.models.openai import OpenAIModel
from netra.testing import config_for_tests, open_server, token_for

from .conftest import settle
from .test_golden_path import assert_run_shape

# An httpx body iterator left unfinalised would show up as an unraisable
# ResourceWarning: a leak on the server's run path, so make it fail here.
pytestmark = [
    pytest.mark.filterwarnings(r"error:Async generator 'http(x|core)\.:ResourceWarning"),
]

TIMEOUT = 15.0


# -- the fake OpenAI server ---------------------------------------------------


@attrs.define(eq=False)
class Exchange:
    """One request (one connection: every answer says ``Connection: close``)."""

    stream: trio.SocketStream
    body: dict[str, Any]
    fake: FakeOpenAI

    async def start(self) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        await self.stream.send_all(head.encode())

    async def send(self, payload: Any) -> None:
        data = ("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n").encode()
        await self.stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))

    async def finish(self, prompt: int, completion: int, reason: str = "stop") -> None:
        await self.send(chunk(finish=reason))
        await self.send({"id": "c", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})
        await self.send("[DONE]")
        await self.stream.send_all(b"0\r\n\r\n")

    async def until_disconnect(self) -> None:
        try:
            while await self.stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        self.fake.disconnected.set()


Handler = Callable[[Exchange], Awaitable[None]]


@attrs.define(eq=False)
class FakeOpenAI:
    handlers: list[Handler]
    bodies: list[dict[str, Any]] = attrs.field(factory=list)
    paths: list[str] = attrs.field(factory=list)
    disconnected: trio.Event = attrs.field(factory=trio.Event)

    async def connection(self, stream: trio.SocketStream) -> None:
        try:
            path, body = await read_request(stream)
            index = len(self.bodies)
            self.paths.append(path)
            self.bodies.append(body)
            if index >= len(self.handlers):
                await stream.send_all(b"HTTP/1.1 418 X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            await self.handlers[index](Exchange(stream, body, self))
        except trio.BrokenResourceError:
            self.disconnected.set()
        finally:
            await trio.aclose_forcefully(stream)


async def read_request(stream: trio.SocketStream) -> tuple[str, dict[str, Any]]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    request_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    while len(rest) < int(headers.get("content-length", "0")):
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError
        rest += data
    return request_line.split(" ")[1], json.loads(rest)


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def call_piece(*, args: str = "", id: str | None = None, name: str | None = None) -> dict[str, Any]:
    piece: dict[str, Any] = {"index": 0, "function": {"arguments": args}}
    if id is not None:
        piece.update(id=id, type="function")
        piece["function"]["name"] = name
    return chunk(tool_calls=[piece])


async def stream_call(ex: Exchange, name: str, id: str, pieces: list[str], usage: tuple[int, int]) -> None:
    await ex.start()
    await ex.send(call_piece(id=id, name=name))
    for piece in pieces:
        await ex.send(call_piece(args=piece))
    await ex.finish(*usage, reason="tool_calls")


@asynccontextmanager
async def netra_on_fake_openai(*handlers: Handler, agents: AgentSet, **config: Any) -> AsyncIterator[tuple[Any, FakeOpenAI]]:
    """A fake OpenAI server playing ``handlers`` in order, one per request,
    and a netra server whose model is the real provider pointed at it."""
    fake = FakeOpenAI(list(handlers))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, fake.connection, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        model = OpenAIModel(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-fake", model="server-default",
            max_retries=0, first_chunk_timeout_s=5.0, idle_timeout_s=5.0,
        )
        try:
            cfg = config_for_tests(model="openai", model_first_chunk_timeout_s=5.0, **config)
            async with open_server(cfg, agents=agents, model=model) as server:
                yield server, fake
                await settle(server.hub)
        finally:
            await model.aclose()
            nursery.cancel_scope.cancel()


# -- a run with a tool call ---------------------------------------------------------


WEATHERMAN = Agent(
    name="weatherman",
    description="Answers with arithmetic.",
    instructions="Use the calculator.",
    tools=("calculator",),
    model="agent-model-7b",
)


async def test_tool_call_in_pieces_then_a_streamed_answer():
    async def first(ex: Exchange) -> None:
        await stream_call(ex, "calculator", "call_abc", ['{"expr', 'ession": ', '"6*7"}'], (11, 7))

    async def second(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk(reasoning_content="The tool said 42."))
        for piece in ("It is ", "42", "."):
            await ex.send(chunk(piece))
        await ex.finish(23, 5)

    agents = AgentSet.of([WEATHERMAN])
    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(first, second, agents=agents) as (server, fake):
            async with connect(server.ws_url, token_for(server, "olga")) as conn:
                events = await conn.collect("what is six times seven?")

    assert_run_shape(events)
    types = [e.type for e in events]
    assert types[:4] == ["agent_started", "agent_thinking", "tool_executing", "tool_completed"]
    assert types[-4:] == ["text_delta", "text_delta", "text_delta", "agent_completed"]
    assert events[0].raw["agent"] == "weatherman"
    assert [e.raw["text"] for e in events if e.type == "agent_thinking"] == ["", "The tool said 42."]
    call, done = events[2].raw, events[3].raw
    assert (call["tool"], call["tool_call_id"], call["args"]) == ("calculator", "call_abc", {"expression": "6*7"})
    assert (done["tool_call_id"], done["result"]) == ("call_abc", 42)
    final = events[-1].raw
    assert final["text"] == "It is 42."
    assert final["usage"] == {"prompt_tokens": 11 + 23, "completion_tokens": 7 + 5}

    assert fake.paths == ["/v1/chat/completions"] * 2
    one, two = fake.bodies
    assert one["model"] == two["model"] == "agent-model-7b"  # the agent's model, not the server's default
    assert one["stream"] is True
    assert one["messages"] == [
        {"role": "system", "content": "Use the calculator."},
        {"role": "user", "content": "what is six times seven?"},
    ]
    assert "calculator" in [t["function"]["name"] for t in one["tools"]]
    assert two["messages"][2:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_abc"},
    ]


# -- routing by the model -------------------------------------------------------------


async def test_the_model_routes_with_route_to_agent_and_nothing_extra_is_sent():
    agents = builtin_agents()
    text = "what would this cost me per month?"  # the rules would say cost_optimizer

    async def route(ex: Exchange) -> None:
        await stream_call(ex, "route_to_agent", "route_1", ['{"agent": ', '"data_analyst"}'], (40, 6))

    async def answer(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk("Send me the numbers."))
        await ex.finish(30, 4)

    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(route, answer, agents=agents) as (server, fake):
            async with connect(server.ws_url, token_for(server, "pat"), record=True) as conn:
                events = await conn.collect(text)
                received = [r.type for r in conn.received]

    assert [e.type for e in events] == ["agent_started", "agent_thinking", "text_delta", "agent_completed"]
    assert received == ["connected", *(e.type for e in events)]
    assert events[0].raw["agent"] == "data_analyst"
    assert events[-1].raw["usage"] == {"prompt_tokens": 30, "completion_tokens": 4}  # the answer's, not routing's

    routing, run = fake.bodies
    assert [t["function"]["name"] for t in routing["tools"]] == ["route_to_agent"]
    enum = routing["tools"][0]["function"]["parameters"]["properties"]["agent"]["enum"]
    assert enum == ["assistant", "data_analyst", "cost_optimizer"]
    assert routing["messages"][-1] == {"role": "user", "content": text}
    assert all(a.description in routing["messages"][0]["content"] for a in agents)
    assert run["messages"][0] == {"role": "system", "content": agents["data_analyst"].instructions}
    assert "statistics" in [t["function"]["name"] for t in run["tools"]]


async def test_a_bad_routing_answer_falls_back_to_the_rules():
    async def route(ex: Exchange) -> None:
        await stream_call(ex, "route_to_agent", "route_1", ['{"agent": "accountant"}'], (40, 6))

    async def answer(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk("Cheaper with batching."))
        await ex.finish(30, 4)

    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(route, answer, agents=builtin_agents()) as (server, fake):
            async with connect(server.ws_url, token_for(server, "pat")) as conn:
                events = await conn.collect("how do I cut my token cost?")
    assert [e.type for e in events] == ["agent_started", "agent_thinking", "text_delta", "agent_completed"]
    assert events[0].raw["agent"] == "cost_optimizer"
    assert len(fake.bodies) == 2


async def test_a_named_agent_is_not_routed():
    async def answer(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk("Hello."))
        await ex.finish(3, 1)

    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(answer, agents=builtin_agents()) as (server, fake):
            async with connect(server.ws_url, token_for(server, "pat")) as conn:
                events = await conn.collect("what does it cost?", agent="assistant")
    assert events[0].raw["agent"] == "assistant" and events[-1].type == "agent_completed"
    assert len(fake.bodies) == 1 and "route_to_agent" not in json.dumps(fake.bodies[0])


# -- cancellation reaches the provider ------------------------------------------------


async def test_cancel_mid_stream_closes_the_http_stream():
    async def endless(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk("Once upon "))
        await ex.send(chunk("a time"))
        await ex.until_disconnect()  # never finishes on its own

    agents = AgentSet.of([WEATHERMAN])
    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(endless, agents=agents) as (server, fake):
            async with connect(server.ws_url, token_for(server, "kim")) as conn:
                events = []
                async for event in conn.run("tell me a long story"):
                    events.append(event)
                    if event.type == "text_delta" and event.raw["delta"] == "a time":
                        await conn.cancel(run_id=event.raw["run_id"])
                with trio.fail_after(3):
                    await fake.disconnected.wait()
                assert server.hub.snapshot()["model_borrowed"] == 0
    assert [e.type for e in events] == ["agent_started", "agent_thinking", "text_delta", "text_delta", "agent_cancelled"]
    assert events[-1].raw["reason"] == "client"
    assert len(fake.bodies) == 1


# -- request options and usage ---------------------------------------------------------


async def test_max_tokens_and_temperature_have_defaults_and_an_agent_may_set_its_own():
    async def answer(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk("fine."))
        await ex.finish(3, 1)

    terse = Agent(name="terse", description="Short answers.", instructions="Be brief.",
                  max_tokens=64, temperature=0.2)
    plain = Agent(name="plain", description="Plain answers.", instructions="Answer.")
    agents = AgentSet.of([plain, terse])
    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(answer, answer, agents=agents, model_max_tokens=1000) as (server, fake):
            async with connect(server.ws_url, token_for(server, "pia")) as conn:
                await conn.collect("hello", agent="plain")
                await conn.collect("hello", agent="terse")
    default, own = fake.bodies
    assert default["max_tokens"] == 1000 and "temperature" not in default  # the provider's temperature
    assert own["max_tokens"] == 64 and own["temperature"] == 0.2


async def test_a_provider_that_sends_no_usage_reports_it_unknown_not_zero():
    async def answer(ex: Exchange) -> None:
        await ex.start()
        await ex.send(chunk("no usage from me."))
        await ex.send(chunk(finish="stop"))
        await ex.send("[DONE]")
        await ex.stream.send_all(b"0\r\n\r\n")

    agents = AgentSet.of([Agent(name="plain", description="Plain answers.", instructions="Answer.")])
    with trio.fail_after(TIMEOUT):
        async with netra_on_fake_openai(answer, agents=agents) as (server, fake):
            async with connect(server.ws_url, token_for(server, "quin")) as conn:
                events = await conn.collect("hello")
    assert events[-1].type == "agent_completed"
    assert events[-1].raw["usage"] == {"prompt_tokens": None, "completion_tokens": None}
