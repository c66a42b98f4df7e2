"""netra's events as AG-UI events, without a server: orders a model can
produce that the scripted one does not (reasoning after text in one step,
parallel tool calls, a run cut mid-answer), each closed the AG-UI way; and
calls waiting for approval as an interrupt, and the stream that resumes
the run."""

from __future__ import annotations

import json

import pytest
from ag_ui.encoder import EventEncoder

from netra.agui._events import RunEvents
from netra.errors import Busy
from netra.protocol import (
    AgentCancelled,
    AgentCompleted,
    AgentError,
    AgentStarted,
    AgentThinking,
    ApprovalRequired,
    Error,
    RunQueued,
    TextDelta,
    ToolCompleted,
    ToolExecuting,
)

from .test_agui import Answer, assert_agui_run, parse_sse
from .test_approvals import transfer

R, T, M = "run_1", "thread-1", "msg_1"


def wire(events: list, *, ending=None, mapper: RunEvents | None = None) -> Answer:
    """The events as a stream's bytes, read back as a client reads them."""
    mapper = mapper or RunEvents(thread_id=T, run_id="client-run")
    out = mapper.started(R, "assistant", ts=1)
    for event in [*events, *([ending] if ending else [])]:
        out += mapper.translate(event, ts=2)
    return read_back(out)


def read_back(out: list) -> Answer:
    raw = "".join(EventEncoder().encode(e) for e in out)
    return Answer(200, None, parse_sse(raw), raw=raw)  # type: ignore[arg-type]


def think(step: int, text: str = "") -> AgentThinking:
    return AgentThinking(run_id=R, thread_id=T, agent="assistant", text=text, step=step)


def delta(text: str) -> TextDelta:
    return TextDelta(run_id=R, thread_id=T, message_id=M, delta=text)


def call(n: int) -> ToolExecuting:
    return ToolExecuting(run_id=R, thread_id=T, tool_call_id=f"call_{n}", tool="calculator", args={"expression": "1"})


def done(n: int, **kw) -> ToolCompleted:
    return ToolCompleted(run_id=R, thread_id=T, tool_call_id=f"call_{n}", tool="calculator", duration_ms=1, **kw)


STARTED = AgentStarted(run_id=R, thread_id=T, agent="assistant", message_id=M)
COMPLETED = AgentCompleted(
    run_id=R, thread_id=T, message_id=M, text="", usage={"prompt_tokens": None, "completion_tokens": None},
    duration_ms=3, agent="assistant",
)


def test_interleaved_reasoning_text_and_parallel_tool_calls_are_bracketed():
    answer = wire([
        RunQueued(run_id=R, thread_id=T, position=2), STARTED,
        think(1, "let me"), think(1, " see"), delta("partial "), think(1, "more thought"), delta("answer"),
        call(1), call(2), done(2, result=2), done(1, error="boom"),
        think(2), delta("the end"),
    ], ending=COMPLETED)
    assert_agui_run(answer)
    assert [e["value"] for e in answer.of("CUSTOM")][0] == {"position": 2}
    reasoning = answer.of("REASONING_MESSAGE_CONTENT")
    assert [e["delta"] for e in reasoning] == ["let me", " see", "more thought"]
    assert len({e["messageId"] for e in reasoning}) == 2  # reopened after the text: a second message
    assert {e["messageId"] for e in answer.of("TEXT_MESSAGE_START")} == {M}  # one answer message, reopened
    assert answer.text() == "partial answerthe end"
    results = answer.of("TOOL_CALL_RESULT")
    assert [(e["toolCallId"], json.loads(e["content"])) for e in results] == [
        (f"{R}.call_2", 2), (f"{R}.call_1", {"error": "boom"}),
    ]
    assert "usage" not in answer.terminal  # the model reported none: unknown, not zero


@pytest.mark.parametrize(
    ("ending", "last"),
    [
        (AgentError(run_id=R, thread_id=T, code="timeout", message="too slow", retryable=True), "RUN_ERROR"),
        (AgentCancelled(run_id=R, thread_id=T, reason="shutdown"), "RUN_FINISHED"),
        (Error(code="store_error", message="down", run_id=None), "RUN_ERROR"),
    ],
)
def test_a_run_cut_mid_answer_closes_what_is_open_before_its_ending(ending, last):
    answer = wire([STARTED, think(1, "hmm"), delta("half an ans")], ending=ending)
    assert_agui_run(answer, outcome=last)
    assert answer.types()[-3:] == ["TEXT_MESSAGE_END", "STEP_FINISHED", last]


def test_nothing_follows_the_ending():
    answer = wire([STARTED, think(1), COMPLETED, delta("late"), call(9)])
    assert answer.types()[-1] == "RUN_FINISHED" and not answer.of("TOOL_CALL_START")


def test_a_refused_run_is_one_run_error_with_when_to_retry():
    mapper = RunEvents(thread_id=T, run_id="client-run")
    [event] = mapper.refused(Busy("capacity is full", retry_after_ms=1000), ts=1)
    assert (event.code, event.message) == ("busy", "capacity is full")
    assert event.metadata == {"netra": {"retryable": True, "retry_after_ms": 1000}}
    assert mapper.translate(STARTED, ts=2) == []


# -- calls waiting for approval: an interrupt, then the stream that resumes ------------


def ask(n: int, **args) -> ApprovalRequired:
    return ApprovalRequired(run_id=R, thread_id=T, tool_call_id=f"call_{n}", tool="transfer",
                            args=args or {"amount": 5, "to": "bo"}, expires_at_ms=1_700_000_300_000)


def interrupted(events: list, asks: list, **kw) -> tuple[RunEvents, Answer]:
    mapper = RunEvents(thread_id=T, run_id="client-run")
    out = mapper.started(R, "assistant", ts=1)
    for event in events:
        out += mapper.translate(event, ts=2)
    out += mapper.interrupt(asks, ts=3, **kw)
    return mapper, read_back(out)


def test_calls_waiting_for_approval_end_the_stream_with_an_interrupt_outcome():
    mapper, answer = interrupted(
        [STARTED, think(1, "hmm"), delta("let me send it")], [ask(1), ask(2, amount=7, to="cy")],
        tool_of={"transfer": transfer}.get,
    )
    assert_agui_run(answer)  # everything closed first; the ending validates against the protocol's models
    assert answer.types()[-9:] == [
        "TEXT_MESSAGE_END", *["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"] * 2,
        "STEP_FINISHED", "RUN_FINISHED",
    ]
    starts = answer.of("TOOL_CALL_START")
    assert [(e["toolCallId"], e["toolCallName"], e["parentMessageId"]) for e in starts] == [
        (f"{R}.call_1", "transfer", M), (f"{R}.call_2", "transfer", M),
    ]
    assert [json.loads(e["delta"]) for e in answer.of("TOOL_CALL_ARGS")] == [
        {"amount": 5, "to": "bo"}, {"amount": 7, "to": "cy"},
    ]  # the model's arguments: the call has not run
    outcome = answer.terminal["outcome"]
    assert outcome["type"] == "interrupt" and "usage" not in answer.terminal
    first, second = outcome["interrupts"]
    assert first["id"] == f"{R}.call_1.approval" and second["id"] == f"{R}.call_2.approval"
    assert (first["reason"], first["toolCallId"]) == ("tool_approval", f"{R}.call_1")
    assert "transfer" in first["message"]
    assert first["expiresAt"] == "2023-11-14T22:18:20.000Z"
    assert first["metadata"]["netra"] == {
        "run_id": R, "tool_call_id": "call_1", "tool": "transfer", "args": {"amount": 5, "to": "bo"},
        "expires_at_ms": 1_700_000_300_000,
    }
    schema = first["responseSchema"]
    assert schema["required"] == ["approve"] and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"approve", "args", "reason"}
    assert schema["properties"]["args"]["properties"] == transfer.parameters["properties"]  # a form for the edit
    assert answer.terminal["metadata"]["netra"] == {"run_id": R, "agent": "assistant"}
    assert mapper.ended and mapper.interrupted
    assert mapper.translate(delta("late"), ts=4) == []


def test_an_interrupt_for_a_tool_not_known_still_describes_its_answer():
    _, answer = interrupted([STARTED, think(1)], [ask(1)])
    schema = answer.terminal["outcome"]["interrupts"][0]["responseSchema"]
    assert schema["properties"]["args"]["type"] == "object"


def test_the_resumed_stream_goes_on_in_the_same_step_message_and_calls():
    mapper, first = interrupted([STARTED, think(1, "thinking"), delta("sending ")], [ask(1), ask(2)])
    then = mapper.continued("client-run-2")
    out = then.resumed(ts=5, ignored=["stale.approval"])
    edited, as_asked = (
        ToolExecuting(run_id=R, thread_id=T, tool_call_id=f"call_{n}", tool="transfer", args={"amount": a, "to": "bo"})
        for n, a in ((1, 1), (2, 5))
    )
    for event in [
        edited, as_asked, done(1, result={"sent": 1}), done(2, error="the user declined this call"),
        think(2, "now answer"), delta("done"),
    ]:
        out += then.translate(event, ts=6)
    out += then.translate(COMPLETED, ts=7)
    answer = read_back(out)
    assert_agui_run(answer)
    started = answer.events[0]
    assert (started["type"], started["runId"], started["threadId"]) == ("RUN_STARTED", "client-run-2", T)
    assert started["metadata"]["netra"] == {
        "run_id": R, "agent": "assistant", "resumed": True, "resume_ignored": ["stale.approval"],
    }
    assert answer.types()[:2] == ["RUN_STARTED", "STEP_STARTED"]
    assert answer.events[1]["stepName"] == "step 1"  # where the run stopped: its tool results belong there
    assert not answer.of("TOOL_CALL_START")  # announced by the interrupted stream: not twice
    ok, refused = answer.of("TOOL_CALL_RESULT")
    assert (ok["toolCallId"], json.loads(ok["content"])) == (f"{R}.call_1", {"sent": 1})
    assert ok["metadata"]["netra"]["args"] == {"amount": 1, "to": "bo"}  # it ran with the user's arguments
    assert "args" not in refused["metadata"]["netra"]
    assert json.loads(refused["content"]) == {"error": "the user declined this call"}
    assert {e["messageId"] for e in answer.of("TEXT_MESSAGE_START")} == {M}  # the same answer message
    reasoning = {e["messageId"] for e in first.of("REASONING_START") + answer.of("REASONING_START")}
    assert len(reasoning) == 2  # reasoning ids are not reused across the two streams
    assert [e["stepName"] for e in answer.of("STEP_STARTED")] == ["step 1", "step 2"]
