"""Reading an AG-UI ``RunAgentInput``: what netra takes from it (a run's
message, or the answers of a resume), and that no body at all, however
malformed, gets anything but a clean 4xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netra.agui._input import RunRequest, parse_run_input
from netra.agui._interrupts import ResumeAnswer
from netra.errors import BadRequest, NetraError, TooLarge

from .test_agui import run_input

MAX = 1000


def parse(body: Any) -> RunRequest:
    return parse_run_input(body if isinstance(body, (bytes, str)) else json.dumps(body), max_text_chars=MAX)


def test_the_latest_user_message_is_the_run():
    body = run_input("ignored", messages=[
        {"id": "u1", "role": "user", "content": "first"},
        {"id": "a1", "role": "assistant", "content": "an answer", "toolCalls": [
            {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
        {"id": "t1", "role": "tool", "toolCallId": "c1", "content": "42"},
        {"id": "r1", "role": "reasoning", "content": "thinking"},
        {"id": "u2", "role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "part"}]},
    ], forwardedProps={"agent": "data_analyst", "multitask": "enqueue", "other": [1, 2]})
    run = parse(body)
    assert run == RunRequest(
        thread_id=body["threadId"], run_id=body["runId"], text="second\npart", message_id="u2",
        agent="data_analyst", multitask="enqueue",
    )


def test_tools_context_and_state_are_accepted_and_left_alone():
    body = run_input("hi", tools=[{"name": "render_chart", "description": "draws", "parameters": {"type": "object"}}],
                     context=[{"description": "page", "value": "/pricing"}], state={"anything": [1]},
                     forwardedProps="an application's own value")
    run = parse(body)
    assert (run.text, run.agent, run.multitask) == ("hi", None, None)


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"threadId": ""}, BadRequest, "threadId"),
        ({"threadId": "a" * 129}, BadRequest, "threadId"),
        ({"threadId": "with space"}, BadRequest, "threadId"),
        ({"runId": ""}, BadRequest, "runId"),
        ({"resume": [{"interruptId": "i1", "status": "resolved"}]}, BadRequest, '"approve": true or false'),
        ({"resume": [{"interruptId": "i1", "status": "resolved", "payload": {"approve": "yes"}}]}, BadRequest,
         '"approve": true or false'),
        ({"resume": [{"interruptId": "i1", "status": "resolved", "payload": {"approve": True, "why": 1}}]},
         BadRequest, "unknown fields: why"),
        ({"resume": [{"interruptId": "i1", "status": "resolved", "payload": {"approve": False, "args": {}}}]},
         BadRequest, '"args" goes with "approve": true only'),
        ({"resume": [{"interruptId": "i1", "status": "resolved", "payload": {"approve": True, "args": [1]}}]},
         BadRequest, '"args" must be an object'),
        ({"resume": [{"interruptId": "i1", "status": "resolved", "payload": {"approve": False, "reason": 3}}]},
         BadRequest, '"reason" must be a string'),
        ({"resume": [{"interruptId": "i1", "status": "cancelled"}] * 2}, BadRequest, "twice"),
        ({"resume": [{"interruptId": "", "status": "cancelled"}]}, BadRequest, "interruptId"),
        ({"resume": [{"interruptId": f"i{n}", "status": "cancelled"} for n in range(65)]}, BadRequest, "64"),
        ({"resume": [{"interruptId": "i1", "status": "maybe"}]}, BadRequest, "resume.0.status"),
        ({"messages": [{"id": "", "role": "user", "content": "hi"}]}, BadRequest, "'id'"),
        ({"messages": [{"id": "m", "role": "user", "content": "x" * (MAX + 1)}]}, TooLarge, "longer"),
        ({"messages": [{"id": "m", "role": "user", "content": []}]}, BadRequest, "no text"),
        ({"forwardedProps": {"agent": 7}}, BadRequest, "forwardedProps.agent"),
        ({"forwardedProps": {"agent": ""}}, BadRequest, "forwardedProps.agent"),
        ({"messages": "hello"}, BadRequest, "messages"),
    ],
)
def test_what_netra_cannot_run_is_refused_clearly(change, error, says):
    with pytest.raises(error) as caught:
        parse({**run_input("hi"), **change})
    assert says in caught.value.message


def test_resume_entries_are_read_into_answers_and_need_no_new_user_message():
    body = run_input(None, resume=[
        {"interruptId": "a", "status": "resolved", "payload": {"approve": True, "args": {"amount": 1}}},
        {"interruptId": "b", "status": "resolved", "payload": {"approve": False, "reason": "not now"}},
        {"interruptId": "c", "status": "cancelled", "payload": "whatever it was"},
    ], forwardedProps={"agent": "assistant"})
    run = parse(body)
    assert (run.text, run.message_id, run.agent) == (None, None, "assistant")
    assert run.resume == (
        ResumeAnswer(interrupt_id="a", status="resolved", approve=True, args={"amount": 1}),
        ResumeAnswer(interrupt_id="b", status="resolved", approve=False, reason="not now"),
        ResumeAnswer(interrupt_id="c", status="cancelled"),
    )
    # the conversation a resuming client resends: its latest user message is read as any
    again = parse({**run_input("the question"), "resume": body["resume"]})
    assert again.text == "the question" and len(again.resume) == 3


def test_a_validation_error_names_the_field_and_is_bounded():
    with pytest.raises(BadRequest) as caught:
        parse({"threadId": 1, "runId": [], "messages": [{"role": "nobody" * 1000}] * 50})
    message = caught.value.message
    assert "threadId" in message and "more)" in message and len(message) < 1200


# -- any body at all: a RunRequest or a clean 4xx ------------------------------------


def clean(body: bytes | str) -> None:
    try:
        run = parse_run_input(body, max_text_chars=MAX)
    except NetraError as exc:
        assert 400 <= exc.http_status < 500, exc
        assert exc.message and len(exc.message) < 2000
        return
    assert isinstance(run, RunRequest)
    assert run.text.strip() if run.text is not None else run.resume


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)
field_names = st.sampled_from([
    "threadId", "runId", "messages", "tools", "context", "state", "forwardedProps", "resume",
    "parentRunId", "protocolVersion", "role", "content", "id", "type", "text", "source", "toolCallId",
])
#: Inputs near the real thing: a valid input with fields replaced by anything,
#: and messages and parts made of the protocol's own names.
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "audio", "binary", "x"])},
                               optional={"text": json_values, "source": json_values, "id": json_values})
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system", "developer", "reasoning", "activity", "?"])},
    optional={"id": json_values | st.text(max_size=140), "content": json_values | st.lists(parts, max_size=3),
              "toolCallId": json_values, "toolCalls": json_values, "name": json_values},
)
answers = st.fixed_dictionaries(
    {"interruptId": st.text(max_size=20) | json_values, "status": st.sampled_from(["resolved", "cancelled", "?"])},
    optional={"payload": json_values | st.fixed_dictionaries(
        {"approve": st.booleans() | json_values}, optional={"args": json_values, "reason": json_values, "x": json_values},
    )},
)
near_inputs = st.builds(
    lambda base, replaced, msgs: {**base, **replaced, **({"messages": msgs} if msgs is not None else {})},
    st.just(run_input("hello")),
    st.dictionaries(field_names, json_values | st.lists(answers, max_size=3), max_size=4),
    st.none() | st.lists(messages, max_size=4),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_are_a_run_or_a_clean_4xx(body):
    clean(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=500))
def test_any_text_is_a_run_or_a_clean_4xx(body):
    clean(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_is_a_run_or_a_clean_4xx(value):
    clean(json.dumps(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_inputs)
def test_anything_shaped_like_a_run_input_is_a_run_or_a_clean_4xx(value):
    clean(json.dumps(value))


@pytest.mark.parametrize("body", [
    "[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, '{"threadId": "\\ud800"}', "\ufeff{}", "1e999999",
    json.dumps(run_input("hi", messages=[{"id": "m", "role": "user", "content": "\x00\ud7ff"}])),
])
def test_pathological_bodies_are_a_clean_4xx_or_a_run(body):
    clean(body)
