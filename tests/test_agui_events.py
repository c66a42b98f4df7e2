"""netra's events as AG-UI events, without a server: orders a model can
produce that the scripted one does not (reasoning after text in one step,
parallel tool calls, a run cut mid-answer), each closed the AG-UI way."""

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
    Error,
    RunQueued,
    TextDelta,
    ToolCompleted,
    ToolExecuting,
)

from .test_agui import Answer, assert_agui_run, parse_sse

R, T, M = "run_1", "thread-1", "msg_1"


def wire(events: list, *, ending=None) -> Answer:
    """The events as a stream's bytes, read back as a client reads them."""
    mapper = RunEvents(thread_id=T, run_id="client-run")
    out = mapper.started(R, "assistant", ts=1)
    for event in [*events, *([ending] if ending else [])]:
        out += mapper.translate(event, ts=2)
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
