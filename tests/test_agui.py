"""``POST /agui`` on a real server and real sockets: netra's runs as AG-UI
event streams, every event checked against the ``ag-ui-protocol`` models,
and netra's threads, agents, auth, Origin rules and limits on this path.

The helpers here (``agui_run``, ``run_input``, ``assert_agui_run``) are
shared by the other tests of this path.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import attrs
import httpx
import pytest
import trio
from ag_ui.core import Event
from pydantic import TypeAdapter

from netra.agui._endpoint import RequestRate
from netra.client import connect
from netra.testing import config_for_tests, open_server, token_for

from .conftest import settle
from .test_store_e2e import RecordingModel

CALC = 'what is [[tool:calculator {"expression": "6*7"}]]'
FAILING = "try [[tool:fail {}]]"
EVENT = TypeAdapter(Event)
TERMINAL = ("RUN_FINISHED", "RUN_ERROR")


def run_input(text: str | None = "hello", *, thread_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A RunAgentInput as @ag-ui/client's HttpAgent sends it."""
    messages = [] if text is None else [{"id": str(uuid.uuid4()), "role": "user", "content": text}]
    return {
        "threadId": thread_id or str(uuid.uuid4()),
        "runId": str(uuid.uuid4()),
        "tools": [],
        "context": [],
        "forwardedProps": {},
        "state": {},
        "messages": messages,
        **fields,
    }


@attrs.frozen
class Answer:
    """One /agui response: its status and headers, and its events (or JSON error)."""

    status: int
    headers: httpx.Headers
    events: list[dict[str, Any]]
    body: Any = None  # the JSON body of a refusal
    raw: str = ""

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def terminal(self) -> dict[str, Any]:
        return self.events[-1]

    def text(self) -> str:
        return "".join(e["delta"] for e in self.of("TEXT_MESSAGE_CONTENT"))


def parse_sse(raw: str) -> list[dict[str, Any]]:
    """SSE as AG-UI's client reads it: events split on blank lines, ``data:`` lines only."""
    events = []
    for block in raw.split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


async def agui_run(
    server: Any, token: str | None, body: Any, *, headers: dict[str, str] | None = None, timeout: float = 10
) -> Answer:
    """POST a run and read its whole answer."""
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    with trio.fail_after(timeout):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=timeout) as http:
            async with http.stream("POST", "/agui", content=content, headers=hdrs) as r:
                raw = (await r.aread()).decode()
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return Answer(r.status_code, r.headers, parse_sse(raw), raw=raw)
    return Answer(r.status_code, r.headers, [], body=json.loads(raw) if raw else None, raw=raw)


def validate(events: list[dict[str, Any]]) -> list[Any]:
    """Every event as the ag-ui-protocol models read it, with nothing they do not know."""
    models = []
    for obj in events:
        model = EVENT.validate_python(obj)
        assert not model.model_extra, f"fields the protocol does not have: {model.model_extra} in {obj}"
        assert json.loads(model.model_dump_json(by_alias=True)) == obj  # the wire is the model, exactly
        models.append(model)
    return models


def assert_agui_run(answer: Answer, *, outcome: str = "RUN_FINISHED") -> None:
    """The rules of AG-UI's client verifier, for one run: RUN_STARTED first (or a
    lone RUN_ERROR), one terminal event last, and every message, reasoning
    message, step and tool call closed before a RUN_FINISHED."""
    assert answer.status == 200, answer
    validate(answer.events)
    types = answer.types()
    assert types[-1] == outcome, types
    assert sum(t in TERMINAL for t in types) == 1, types
    assert types[0] == "RUN_STARTED" or types == ["RUN_ERROR"], types
    open_: dict[str, set[str]] = {"text": set(), "reasoning": set(), "span": set(), "step": set(), "tool": set()}
    pairs = {
        "TEXT_MESSAGE_START": ("text", "messageId", True), "TEXT_MESSAGE_END": ("text", "messageId", False),
        "REASONING_START": ("span", "messageId", True), "REASONING_END": ("span", "messageId", False),
        "REASONING_MESSAGE_START": ("reasoning", "messageId", True),
        "REASONING_MESSAGE_END": ("reasoning", "messageId", False),
        "STEP_STARTED": ("step", "stepName", True), "STEP_FINISHED": ("step", "stepName", False),
        "TOOL_CALL_START": ("tool", "toolCallId", True), "TOOL_CALL_END": ("tool", "toolCallId", False),
    }
    inside = {"TEXT_MESSAGE_CONTENT": ("text", "messageId"), "REASONING_MESSAGE_CONTENT": ("reasoning", "messageId"),
              "TOOL_CALL_ARGS": ("tool", "toolCallId")}
    for e in answer.events:
        kind = e["type"]
        if kind in pairs:
            bucket, key, opens = pairs[kind]
            if opens:
                assert e[key] not in open_[bucket], f"{kind} of an open {bucket}: {e}"
                open_[bucket].add(e[key])
            else:
                assert e[key] in open_[bucket], f"{kind} of nothing open: {e}"
                open_[bucket].discard(e[key])
        elif kind in inside:
            bucket, key = inside[kind]
            assert e[key] in open_[bucket], f"{kind} outside its {bucket}: {e}"
    if outcome == "RUN_FINISHED":
        assert not any(open_.values()), open_
    run_ids = {e["runId"] for e in answer.events if "runId" in e}
    assert len(run_ids) <= 1


def netra_run_id(answer: Answer) -> str:
    return answer.events[0]["metadata"]["netra"]["run_id"]


async def thread_of(server: Any, token: str, thread_id: str) -> httpx.Response:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            return await http.get(f"/api/threads/{thread_id}", headers={"Authorization": f"Bearer {token}"})


# -- a run, as AG-UI events ---------------------------------------------------------


async def test_a_plain_answer_is_an_agui_run_of_netras_answer(server):
    token = token_for(server, "alice")
    body = run_input("hello [[stream:6]]")
    answer = await agui_run(server, token, body)
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-cache"
    assert_agui_run(answer)
    started = answer.events[0]
    assert (started["threadId"], started["runId"]) == (body["threadId"], body["runId"])
    assert started["protocolVersion"] == "1.0"
    assert answer.terminal["runId"] == body["runId"] and "outcome" not in answer.terminal
    [agent] = answer.of("CUSTOM")
    assert agent["name"] == "netra.agent_started" and agent["value"]["agent"] == "assistant"
    assert [e["type"] for e in answer.events if e["type"].startswith("TEXT")][0] == "TEXT_MESSAGE_START"
    assert answer.of("TEXT_MESSAGE_START")[0]["messageId"] == agent["value"]["message_id"]
    assert answer.text().startswith("You said: “hello”")
    usage = answer.terminal["usage"][0]
    assert usage["inputTokens"] > 0 and usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    # what the stream said is what the thread recorded
    stored = (await thread_of(server, token, body["threadId"])).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["text"] == answer.text()
    assert stored["messages"][1]["id"] == agent["value"]["message_id"]
    assert stored["runs"][0]["id"] == netra_run_id(answer) and stored["runs"][0]["status"] == "completed"
    await settle(server.hub)


async def test_every_event_of_a_run_with_tools_validates_against_the_protocol_models(server):
    answer = await agui_run(
        server, token_for(server, "alice"),
        run_input(f'{CALC} and [[tool:unit_convert {{"value": 1, "from_unit": "km", "to_unit": "m"}}]] '
                  f'and [[tool:fail {{}}]] [[stream:9]]'),
    )
    assert_agui_run(answer)
    models = validate(answer.events)
    assert {type(m).__name__ for m in models} >= {
        "RunStartedEvent", "CustomEvent", "StepStartedEvent", "StepFinishedEvent", "ReasoningStartEvent",
        "ReasoningMessageStartEvent", "ReasoningMessageContentEvent", "ReasoningMessageEndEvent",
        "ReasoningEndEvent", "ToolCallStartEvent", "ToolCallArgsEvent", "ToolCallEndEvent",
        "ToolCallResultEvent", "TextMessageStartEvent", "TextMessageContentEvent", "TextMessageEndEvent",
        "RunFinishedEvent",
    }
    assert [m.step_name for m in models if type(m).__name__ == "StepStartedEvent"] == [
        "step 1", "step 2", "step 3", "step 4"
    ]


async def test_a_tool_call_and_a_failing_tool(server):
    answer = await agui_run(server, token_for(server, "alice"), run_input(f"{CALC} then {FAILING}"))
    assert_agui_run(answer)
    tool_events = [e for e in answer.events if e["type"].startswith("TOOL_CALL")]
    assert [e["type"] for e in tool_events] == [
        "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT",
    ] * 2
    calc, fail = tool_events[0], tool_events[4]
    assert calc["toolCallName"] == "calculator" and fail["toolCallName"] == "fail"
    message_id = answer.of("CUSTOM")[0]["value"]["message_id"]
    assert calc["parentMessageId"] == fail["parentMessageId"] == message_id
    assert calc["toolCallId"] == f"{netra_run_id(answer)}.call_1"
    assert json.loads(tool_events[1]["delta"]) == {"expression": "6*7"}
    ok, failed = tool_events[3], tool_events[7]
    assert ok["toolCallId"] == calc["toolCallId"] and json.loads(ok["content"]) == 42
    assert ok["role"] == "tool" and ok["messageId"] != message_id
    assert json.loads(failed["content"]) == {"error": "RuntimeError: chaos: fail"}
    assert failed["metadata"]["netra"]["error"] == "RuntimeError: chaos: fail"
    # a failed tool is a result the model reads, not a failed run
    assert answer.terminal["type"] == "RUN_FINISHED"
    assert "calculator returned 42" in answer.text() and "fail failed" in answer.text()


async def test_a_failed_run_is_a_run_error_with_netras_code(server):
    answer = await agui_run(server, token_for(server, "alice"), run_input("hi [[model:fail_midstream]] [[stream:3]]"))
    assert_agui_run(answer, outcome="RUN_ERROR")
    error = answer.terminal
    assert error["code"] == "llm_error" and error["metadata"]["netra"]["retryable"] is True
    assert error["metadata"]["netra"]["run_id"] == netra_run_id(answer)
    # what was open was closed first, as for a finished run
    assert answer.types()[-3:] == ["TEXT_MESSAGE_END", "STEP_FINISHED", "RUN_ERROR"]


# -- netra's threads ------------------------------------------------------------------


async def test_an_agui_run_makes_a_netra_thread_under_the_clients_thread_id(server):
    token = token_for(server, "alice")
    thread_id = f"ui-thread-{uuid.uuid4()}"
    first = await agui_run(server, token, run_input("first", thread_id=thread_id))
    second = await agui_run(server, token, run_input("second", thread_id=thread_id))
    assert_agui_run(first)
    assert_agui_run(second)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            listed = (await http.get("/api/threads", headers={"Authorization": f"Bearer {token}"})).json()
    assert [t["id"] for t in listed["threads"]] == [thread_id]
    stored = (await thread_of(server, token, thread_id)).json()
    assert [m["text"][:6] for m in stored["messages"] if m["role"] == "user"] == ["first", "second"]
    assert len(stored["runs"]) == 2


async def test_a_thread_started_on_ws_continues_through_agui(server):
    token = token_for(server, "alice")
    with trio.fail_after(10):
        async with connect(server.ws_url, token) as conn:
            events = await conn.collect("remember this")
    thread_id = events[-1].raw["thread_id"]
    answer = await agui_run(server, token, run_input("and now?", thread_id=thread_id))
    assert_agui_run(answer)
    assert answer.events[0]["threadId"] == thread_id
    stored = (await thread_of(server, token, thread_id)).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 2
    assert stored["messages"][2]["text"] == "and now?"


async def test_another_users_thread_is_not_found_and_left_alone(server):
    alice, bob = token_for(server, "alice"), token_for(server, "bob")
    thread_id = f"alice-{uuid.uuid4()}"
    assert_agui_run(await agui_run(server, alice, run_input("mine", thread_id=thread_id)))
    answer = await agui_run(server, bob, run_input("let me in", thread_id=thread_id))
    assert_agui_run(answer, outcome="RUN_ERROR")
    assert answer.terminal["code"] == "not_found"
    assert answer.of("TEXT_MESSAGE_CONTENT") == [] and answer.of("TOOL_CALL_START") == []
    stored = (await thread_of(server, alice, thread_id)).json()
    assert [m["text"] for m in stored["messages"] if m["role"] == "user"] == ["mine"]
    assert (await thread_of(server, bob, thread_id)).status_code == 404
    await settle(server.hub)


async def test_the_same_user_message_is_answered_once(server):
    token = token_for(server, "alice")
    body = run_input("once")
    assert_agui_run(await agui_run(server, token, body))
    again = await agui_run(server, token, {**body, "runId": str(uuid.uuid4())})
    assert_agui_run(again, outcome="RUN_ERROR")
    assert again.terminal["code"] == "bad_request"


async def test_the_agent_is_forwarded_props_agent_or_netras_choice(server):
    token = token_for(server, "alice")
    chosen = await agui_run(server, token, run_input("hello", forwardedProps={"agent": "data_analyst"}))
    assert chosen.of("CUSTOM")[0]["value"]["agent"] == "data_analyst"
    routed = await agui_run(server, token, run_input("what is the median of my data"))
    assert routed.of("CUSTOM")[0]["value"]["agent"] == "data_analyst"  # /ws's rules: keywords
    default = await agui_run(server, token, run_input("hello"))
    assert default.of("CUSTOM")[0]["value"]["agent"] == "assistant"
    unknown = await agui_run(server, token, run_input("hello", forwardedProps={"agent": "nobody"}))
    assert unknown.status == 404 and unknown.body["code"] == "not_found"


# -- refusals before the stream: HTTP status and JSON -----------------------------------


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{}", 400, "threadId: Field required"),
        (run_input(None), 400, "no user message"),
        (run_input("hi", messages=[{"id": "a", "role": "assistant", "content": "hello"}]), 400, "no user message"),
        (run_input("hi", messages=[{"id": "m", "role": "robot", "content": "x"}]), 400, "messages.0"),
        (run_input("   "), 400, "no text"),
        (run_input("hi", threadId="../etc"), 400, "threadId"),
        (run_input("hi", messages=[{"id": "m", "role": "user", "content": [
            {"type": "image", "source": {"type": "url", "value": "https://x/y.png"}}]}]), 400, "image"),
        (run_input("hi", forwardedProps={"multitask": "maybe"}), 400, "multitask"),
        (run_input("x" * 40000), 413, "longer than"),
        (b"{" + b" " * (2 << 20) + b"}", 413, "too large"),
    ],
)
async def test_bad_input_is_a_4xx_with_a_json_error_before_any_stream(server, body, status, says):
    answer = await agui_run(server, token_for(server, "alice"), body)
    assert answer.status == status, answer.raw[:300]
    assert answer.headers["content-type"] == "application/json"
    assert set(answer.body) == {"code", "message"} and says in answer.body["message"], answer.body
    await settle(server.hub)


async def test_auth_is_the_same_bearer_token_as_ws(server):
    body = run_input("hi")
    missing = await agui_run(server, None, body)
    assert (missing.status, missing.body["code"]) == (401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    bad = await agui_run(server, "not-a-token", body)
    assert (bad.status, bad.body["code"]) == (401, "unauthorized")
    expired = await agui_run(server, token_for(server, "alice", ttl_s=-60), body)
    assert expired.status == 401
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            r = await http.post(f"/agui?token={token_for(server, 'alice')}", json=body)
    assert (r.status_code, r.json()["code"]) == (400, "bad_request")


async def test_origin_rules_and_cors_for_allowed_origins():
    config = config_for_tests(allowed_origins=("https://app.example",))
    async with open_server(config) as server:
        token = token_for(server, "alice")
        foreign = await agui_run(server, token, run_input("hi"), headers={"Origin": "https://evil.example"})
        assert (foreign.status, foreign.body["code"]) == (403, "forbidden")
        allowed = await agui_run(server, token, run_input("hi"), headers={"Origin": "https://app.example"})
        assert_agui_run(allowed)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                pre = await http.options("/agui", headers={
                    "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                })
                assert pre.status_code == 204
                assert pre.headers["access-control-allow-origin"] == "https://app.example"
                assert "authorization" in pre.headers["access-control-allow-headers"]
                assert "POST" in pre.headers["access-control-allow-methods"]
                refused = await http.options("/agui", headers={"Origin": "https://evil.example"})
                assert refused.status_code == 403


async def test_each_users_request_rate_is_ws_message_rate():
    async with open_server(config_for_tests(rate_per_s=0.5, rate_burst=2)) as server:
        alice = token_for(server, "alice")
        for _ in range(2):
            assert_agui_run(await agui_run(server, alice, run_input("hi")))
        limited = await agui_run(server, alice, run_input("hi"))
        assert (limited.status, limited.body["code"]) == (429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
        assert_agui_run(await agui_run(server, token_for(server, "bob"), run_input("hi")))  # per user


async def test_request_rate_refills_at_its_rate(autojump_clock):
    rate = RequestRate(2.0, 3)
    assert [rate.take("a") for _ in range(3)] == [None, None, None]
    assert rate.take("a") == 500
    assert rate.take("b") is None
    await trio.sleep(0.5)
    assert rate.take("a") is None and rate.take("a") == 500
    await trio.sleep(10)
    assert [rate.take("a") for _ in range(4)] == [None, None, None, 500]


async def test_a_refused_run_is_a_lone_run_error():
    """Refused once the stream has begun (a thread with a run in progress,
    multitask reject): one RUN_ERROR with netra's code, nothing else."""
    async with open_server(config_for_tests()) as server:
        token = token_for(server, "alice")
        thread_id = f"busy-{uuid.uuid4()}"
        async with trio.open_nursery() as nursery:
            first: list[Answer] = []

            async def slow() -> None:
                first.append(await agui_run(server, token, run_input(
                    '[[tool:sleep {"ms": 800}]]', thread_id=thread_id)))

            nursery.start_soon(slow)
            with trio.fail_after(5):
                while not server.hub.users.get("alice") or not server.hub.users["alice"].runs:
                    await trio.sleep(0.01)
            refused = await agui_run(server, token, run_input(
                "me too", thread_id=thread_id, forwardedProps={"multitask": "reject"}))
        assert refused.types() == ["RUN_ERROR"]
        assert refused.terminal["code"] == "run_in_progress"
        assert refused.terminal["metadata"]["netra"]["retryable"] is True
        assert_agui_run(refused, outcome="RUN_ERROR")
        assert_agui_run(first[0])
        await settle(server.hub)


# -- the stream lives as long as its run ------------------------------------------------


async def test_a_quiet_run_outlives_the_read_deadline_and_keeps_the_stream_alive():
    config = config_for_tests(handshake_timeout_s=0.4, heartbeat_interval_s=0.25)
    async with open_server(config) as server:
        answer = await agui_run(server, token_for(server, "alice"), run_input('[[tool:sleep {"ms": 1200}]]'))
        assert_agui_run(answer)
        assert answer.raw.count(": keep-alive\n\n") >= 3


async def test_an_idle_keep_alive_connection_is_still_let_go():
    async with open_server(config_for_tests(handshake_timeout_s=0.4)) as server:
        host, port = server.listener.address
        sock = trio.socket.socket()
        with trio.fail_after(5):
            await sock.connect((host, port))
            await sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            began = trio.current_time()
            received = b""
            while chunk := await sock.recv(4096):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        assert 0.3 < trio.current_time() - began < 2
        sock.close()


async def test_a_draining_server_cancels_the_run_and_ends_its_stream():
    async with open_server(config_for_tests(drain_grace_s=0.2)) as server:
        answers: list[Answer] = []

        async def run() -> None:
            answers.append(await agui_run(server, token_for(server, "alice"), run_input("[[tool:hang {}]]")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.fail_after(5):
                while not any(getattr(s, "run", None) and s.run.executing for s in server.hub.sessions):
                    await trio.sleep(0.01)
            server.request_stop()
    [answer] = answers
    assert_agui_run(answer)
    assert answer.terminal["outcome"] == {"type": "cancelled"}
    assert answer.terminal["metadata"]["netra"]["cancel_reason"] == "shutdown"


async def test_each_request_is_a_connection_under_ws_connection_limits():
    async with open_server(config_for_tests(max_connections_per_user=1, drain_grace_s=0.2)) as server:
        token = token_for(server, "alice")
        answers: list[Answer] = []

        async def hang() -> None:
            answers.append(await agui_run(server, token, run_input("[[tool:hang {}]]")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang)
            with trio.fail_after(5):
                while not server.hub.users.get("alice") or not server.hub.users["alice"].runs:
                    await trio.sleep(0.01)
            second = await agui_run(server, token, run_input("and another"))
            assert (second.status, second.body["code"]) == (429, "rate_limited")
            assert second.body["message"] == "too many connections"
            assert_agui_run(await agui_run(server, token_for(server, "bob"), run_input("bob may")))
            server.request_stop()  # ends the hanging run: its stream finishes, cancelled
        assert answers[0].terminal["outcome"] == {"type": "cancelled"}


async def test_a_run_interrupted_by_the_next_one_on_its_thread_finishes_cancelled(server):
    token = token_for(server, "alice")
    thread_id = f"interrupted-{uuid.uuid4()}"
    answers: list[Answer] = []

    async def first() -> None:
        answers.append(await agui_run(server, token, run_input("[[tool:hang {}]]", thread_id=thread_id)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        with trio.fail_after(5):
            while not server.hub.users.get("alice") or not server.hub.users["alice"].runs:
                await trio.sleep(0.01)
        second = await agui_run(server, token, run_input(
            "never mind", thread_id=thread_id, forwardedProps={"multitask": "interrupt"}))
    assert_agui_run(second)
    [interrupted] = answers
    assert_agui_run(interrupted)
    assert interrupted.terminal["outcome"] == {"type": "cancelled"}
    assert interrupted.terminal["metadata"]["netra"]["cancel_reason"] == "interrupted"
    await settle(server.hub)


async def test_agui_threads_on_the_sql_stores(backend):
    """The thread an AG-UI client names is a thread of the SQL stores too:
    created under its id, continued with its history reaching the model,
    and another user's stays theirs."""
    model = RecordingModel()
    config = config_for_tests(database_url=backend.url, store_pool_size=4)
    async with open_server(config, model=model, store="config") as server:
        alice, bob = token_for(server, "alice"), token_for(server, "bob")
        thread_id = f"sql-{uuid.uuid4()}"
        assert_agui_run(await agui_run(server, alice, run_input("first question", thread_id=thread_id)))
        assert_agui_run(await agui_run(server, alice, run_input("second question", thread_id=thread_id)))
        seen = [m.content for m in model.requests[-1].messages if m.role in ("user", "assistant")]
        assert seen[0] == "first question" and seen[1].startswith("You said") and seen[-1] == "second question"
        intruder = await agui_run(server, bob, run_input("mine now", thread_id=thread_id))
        assert_agui_run(intruder, outcome="RUN_ERROR")
        assert intruder.terminal["code"] == "not_found"
        stored = (await thread_of(server, alice, thread_id)).json()
        assert [m["text"] for m in stored["messages"] if m["role"] == "user"] == ["first question", "second question"]
        await settle(server.hub)
