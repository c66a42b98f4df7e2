"""Tool approvals over ``/agui``, on a real server and real sockets: a run
whose tool call needs its user's approval ends its AG-UI stream with the
interrupt outcome while the netra run waits, and a new request with
``resume`` entries decides and streams the rest of the same run. Every
event is checked against the ``ag-ui-protocol`` models."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio

from netra.client import connect
from netra.models.base import TextChunk, ToolCallRequest
from netra.testing import config_for_tests, open_server, token_for

from .conftest import by_label, settle
from .test_agui import Answer, agui_run, assert_agui_run, netra_run_id, run_input, thread_of
from .test_approvals import TOOLS, TRANSFER, transfer

TWICE = 'send [[tool:transfer {"amount": 5, "to": "bo"}]] then [[tool:transfer {"amount": 9, "to": "cy"}]]'


@asynccontextmanager
async def approvals_server(**config: Any) -> AsyncIterator[Any]:
    async with open_server(config_for_tests(**config), extra_tools=TOOLS) as server:
        yield server


def resume_of(first: dict[str, Any], *answers: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The input @ag-ui/client sends to resume: the same thread and messages,
    a new runId, and one entry per interrupt."""
    return {**first, "runId": str(uuid.uuid4()), "resume": list(answers), **fields}


def approve(interrupt: dict[str, Any], **payload: Any) -> dict[str, Any]:
    return {"interruptId": interrupt["id"], "status": "resolved", "payload": {"approve": True, **payload}}


def deny(interrupt: dict[str, Any], **payload: Any) -> dict[str, Any]:
    return {"interruptId": interrupt["id"], "status": "resolved", "payload": {"approve": False, **payload}}


def interrupts_of(answer: Answer) -> list[dict[str, Any]]:
    """The interrupts a stream ended with (it must have ended with some)."""
    assert_agui_run(answer)
    outcome = answer.terminal["outcome"]
    assert outcome["type"] == "interrupt", answer.terminal
    return outcome["interrupts"]


async def stored_run(server: Any, user: str, thread_id: str) -> Any:
    [run] = (await server.hub.store.get_thread(user, thread_id))[2]
    return run


async def until_stored(server: Any, user: str, thread_id: str, status: str = "completed") -> Any:
    with trio.fail_after(10):
        while (run := await stored_run(server, user, thread_id)).status != status:
            await trio.sleep(0.02)
    return run


# -- pausing at an approval, and resuming -------------------------------------------------


async def test_a_call_waiting_for_approval_ends_the_stream_and_an_approval_resumes_the_run():
    async with approvals_server() as server:
        hub, token = server.hub, token_for(server, "ann")
        first = run_input(TRANSFER)
        paused = await agui_run(server, token, first)
        [interrupt] = interrupts_of(paused)
        run_id = netra_run_id(paused)
        call = paused.of("TOOL_CALL_START")[-1]
        assert interrupt["toolCallId"] == call["toolCallId"] == f"{run_id}.call_1"
        assert interrupt["id"] == f"{run_id}.call_1.approval" and interrupt["reason"] == "tool_approval"
        assert json.loads(paused.of("TOOL_CALL_ARGS")[-1]["delta"]) == {"amount": 5, "to": "bo"}
        assert not paused.of("TOOL_CALL_RESULT")
        meta = interrupt["metadata"]["netra"]
        assert (meta["run_id"], meta["tool_call_id"], meta["tool"]) == (run_id, "call_1", "transfer")
        assert interrupt["responseSchema"]["properties"]["args"]["properties"] == transfer.parameters["properties"]

        # the response is over; the netra run is not: it waits, owned by the server, holding
        # its user's run slot (not a global one: a run waiting for its user holds nothing others need)
        await trio.sleep(0.3)
        assert len(hub.approvals) == 1 and len(hub.agui) == 1
        assert hub.snapshot()["runs_borrowed"] == 0 and hub.users["ann"].run_limiter.borrowed_tokens == 1
        stored = await stored_run(server, "ann", first["threadId"])
        assert stored.status == "running" and stored.approvals[0].status == "pending"

        resumed = await agui_run(server, token, resume_of(first, approve(interrupt)))
        assert_agui_run(resumed)
        started = resumed.events[0]
        assert started["runId"] != first["runId"] and started["threadId"] == first["threadId"]
        assert started["metadata"]["netra"]["run_id"] == run_id  # the same netra run, going on
        assert resumed.types()[:2] == ["RUN_STARTED", "STEP_STARTED"]
        assert not resumed.of("TOOL_CALL_START")  # announced before the pause
        [result] = resumed.of("TOOL_CALL_RESULT")
        assert result["toolCallId"] == call["toolCallId"]
        assert json.loads(result["content"]) == {"sent": 5, "to": "bo"}
        assert "transfer returned" in resumed.text()
        assert "outcome" not in resumed.terminal and resumed.terminal["usage"]
        assert resumed.of("TEXT_MESSAGE_START")[0]["messageId"] == call["parentMessageId"]  # one answer message

        run = await stored_run(server, "ann", first["threadId"])
        assert (run.status, run.approvals[0].status, run.approvals[0].edited_args) == ("completed", "approved", None)
        assert by_label(hub.metrics.runs_affected) == {} and by_label(hub.metrics.runs_failed) == {}
        await settle(hub)
        assert len(hub.agui) == 0


async def test_approved_with_edited_arguments_and_an_edit_that_does_not_fit():
    async with approvals_server() as server:
        token = token_for(server, "ann")
        first = run_input(TRANSFER)
        [interrupt] = interrupts_of(await agui_run(server, token, first))

        misfit = await agui_run(server, token, resume_of(first, approve(interrupt, args={"amount": "lots"})))
        assert (misfit.status, misfit.body["code"]) == (400, "bad_request")
        assert misfit.body["message"].startswith("the edited arguments do not fit transfer: ")
        assert "The call still waits for a decision." in misfit.body["message"]
        assert len(server.hub.approvals) == 1  # nothing was decided

        resumed = await agui_run(server, token, resume_of(first, approve(interrupt, args={"amount": 2, "to": "cy"})))
        assert_agui_run(resumed)
        [result] = resumed.of("TOOL_CALL_RESULT")
        assert json.loads(result["content"]) == {"sent": 2, "to": "cy"}
        assert result["metadata"]["netra"]["args"] == {"amount": 2, "to": "cy"}  # what it ran with
        run = await stored_run(server, "ann", first["threadId"])
        assert run.approvals[0].edited_args == {"amount": 2, "to": "cy"}
        assert run.tool_calls[0].args == {"amount": 2, "to": "cy"}
        await settle(server.hub)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (lambda i: deny(i, reason="not this month"), "the user declined this call: not this month"),
        (lambda i: {"interruptId": i["id"], "status": "cancelled"}, "the user declined this call"),
    ],
)
async def test_denied_or_cancelled_the_model_gets_a_refused_call_and_the_run_goes_on(answer, error):
    async with approvals_server() as server:
        token = token_for(server, "ann")
        first = run_input(TRANSFER)
        [interrupt] = interrupts_of(await agui_run(server, token, first))
        resumed = await agui_run(server, token, resume_of(first, answer(interrupt)))
        assert_agui_run(resumed)
        [result] = resumed.of("TOOL_CALL_RESULT")
        assert json.loads(result["content"]) == {"error": error}
        assert f"transfer failed: {error}" in resumed.text()
        run = await stored_run(server, "ann", first["threadId"])
        assert (run.status, run.approvals[0].status) == ("completed", "denied")
        await settle(server.hub)


async def test_a_resumed_run_may_pause_again_at_its_next_call():
    async with approvals_server() as server:
        token = token_for(server, "ann")
        first = run_input(TWICE)
        [one] = interrupts_of(await agui_run(server, token, first))
        again = await agui_run(server, token, resume_of(first, approve(one)))
        [two] = interrupts_of(again)
        assert two["toolCallId"].endswith(".call_2") and two["metadata"]["netra"]["args"] == {"amount": 9, "to": "cy"}
        assert [e["stepName"] for e in again.of("STEP_STARTED")] == ["step 1", "step 2"]
        assert json.loads(again.of("TOOL_CALL_RESULT")[0]["content"]) == {"sent": 5, "to": "bo"}
        assert again.of("TOOL_CALL_START")[0]["toolCallId"] == two["toolCallId"]
        done = await agui_run(server, token, resume_of(first, deny(two)))
        assert_agui_run(done)
        assert "outcome" not in done.terminal
        run = await stored_run(server, "ann", first["threadId"])
        assert [a.status for a in run.approvals] == ["approved", "denied"]
        await settle(server.hub)


# -- calls of one step that wait at once: one interrupt outcome ---------------------------------


@attrs.frozen
class TwoCalls:
    """A model that calls transfer twice in one turn, then answers."""

    name: str = "scripted"

    def stream(self, request: Any) -> Any:
        return _turn(request.messages[-1].role == "user")


@asynccontextmanager
async def _turn(first: bool) -> AsyncIterator[Any]:
    async def events() -> AsyncIterator[Any]:
        if first:
            yield ToolCallRequest(id="c1", name="transfer", arguments='{"amount": 1, "to": "a"}')
            yield ToolCallRequest(id="c2", name="transfer", arguments='{"amount": 2, "to": "b"}')
        else:
            yield TextChunk(text="both answered")

    yield events()


async def test_parallel_calls_wait_as_one_interrupt_outcome_and_a_resume_must_answer_each():
    async with open_server(config_for_tests(), extra_tools=TOOLS, model=TwoCalls()) as server:
        token = token_for(server, "ann")
        first = run_input("pay both")
        asked = {i["toolCallId"].rsplit(".", 1)[1]: i for i in interrupts_of(await agui_run(server, token, first))}
        one, two = asked.pop("c1"), asked.pop("c2")  # (in the order the calls asked: either)
        assert not asked

        partial = await agui_run(server, token, resume_of(first, approve(one)))
        assert (partial.status, partial.body["code"]) == (400, "bad_request")
        assert two["id"] in partial.body["message"] and len(server.hub.approvals) == 2  # nothing decided

        resumed = await agui_run(server, token, resume_of(first, approve(one), deny(two, reason="no")))
        assert_agui_run(resumed)
        results = {r["toolCallId"]: json.loads(r["content"]) for r in resumed.of("TOOL_CALL_RESULT")}
        assert results == {one["toolCallId"]: {"sent": 1, "to": "a"},
                           two["toolCallId"]: {"error": "the user declined this call: no"}}
        assert resumed.text() == "both answered"
        await settle(server.hub)


# -- the decision comes from elsewhere, or never ------------------------------------------------


async def test_a_ws_tool_decision_decides_a_parked_agui_run():
    async with approvals_server() as server:
        token = token_for(server, "ann")
        first = run_input(TRANSFER)
        [interrupt] = interrupts_of(await agui_run(server, token, first))
        meta = interrupt["metadata"]["netra"]
        with trio.fail_after(10):
            async with connect(server.ws_url, token) as conn:
                await conn.decide(meta["run_id"], meta["tool_call_id"], approve=True, args={"amount": 3, "to": "bo"})
        run = await until_stored(server, "ann", first["threadId"])
        assert run.tool_calls[0].result == {"sent": 3, "to": "bo"}
        assert run.approvals[0].edited_args == {"amount": 3, "to": "bo"}
        await settle(server.hub)
        # the run is over: an answer to its interrupt finds nothing, and changes nothing
        late = await agui_run(server, token, resume_of(first, approve(interrupt)))
        assert (late.status, late.body["code"]) == (404, "not_found")


async def test_no_decision_in_time_while_parked_the_run_finishes_with_the_call_declined():
    async with approvals_server(approval_timeout_s=0.5) as server:
        token = token_for(server, "ann")
        first = run_input(TRANSFER)
        [interrupt] = interrupts_of(await agui_run(server, token, first))
        run = await until_stored(server, "ann", first["threadId"])  # nobody streams it; it goes on anyway
        assert (run.approvals[0].status, run.approvals[0].reason) == ("denied", "timeout")
        assert run.tool_calls[0].error == "not approved: the user did not decide in time (timeout)"
        shown = (await thread_of(server, token, first["threadId"])).json()  # the thread has what the stream did not
        answer = shown["messages"][-1]
        assert answer["role"] == "assistant" and "transfer failed: not approved" in answer["text"]
        assert shown["runs"][0]["tool_calls"][0]["error"] == run.tool_calls[0].error
        await settle(server.hub)
        assert len(server.hub.agui) == 0
        late = await agui_run(server, token, resume_of(first, approve(interrupt)))
        assert (late.status, late.body["code"]) == (404, "not_found")
        # abandoning what no longer waits changes nothing: with a new message it is an ordinary run
        moved_on = await agui_run(server, token, {
            **run_input("never mind", thread_id=first["threadId"]),
            "resume": [{"interruptId": interrupt["id"], "status": "cancelled"}],
        })
        assert_agui_run(moved_on)
        assert moved_on.events[0]["metadata"]["netra"]["resume_ignored"] == [interrupt["id"]]
        assert moved_on.text().startswith("You said: “never mind”")
        await settle(server.hub)


# -- who may resume, and what -----------------------------------------------------------------


async def test_a_resume_of_an_unknown_or_another_users_interrupt_is_not_found_and_changes_nothing():
    async with approvals_server() as server:
        ann, bob = token_for(server, "ann"), token_for(server, "bob")
        first = run_input(TRANSFER)
        [interrupt] = interrupts_of(await agui_run(server, ann, first))
        unknown = {**interrupt, "id": interrupt["id"].replace("call_1", "call_9")}
        tries = [
            (bob, resume_of(first, approve(interrupt))),  # bob, on ann's thread
            (bob, resume_of(run_input(None, thread_id=f"bob-{uuid.uuid4()}"), approve(interrupt))),  # on his own
            (bob, resume_of(run_input(None, thread_id=first["threadId"]), {"interruptId": interrupt["id"],
                                                                            "status": "cancelled"})),
            (ann, resume_of(first, approve(unknown))),
            (ann, resume_of(run_input(None, thread_id=f"other-{uuid.uuid4()}"), approve(interrupt))),  # wrong thread
        ]
        refusals = []
        for token, body in tries:
            answer = await agui_run(server, token, body)
            refusals.append((answer.status, answer.body))
        assert {(status, body["code"]) for status, body in refusals} == {(404, "not_found")}
        assert len({body["message"] for _, body in refusals}) == 1  # the same answer: ids do not leak
        # abandoning it, with a message of his own: his run on ann's thread, refused as any would be
        intruder = await agui_run(server, bob, resume_of(first, {"interruptId": interrupt["id"], "status": "cancelled"}))
        assert_agui_run(intruder, outcome="RUN_ERROR")
        assert intruder.terminal["code"] == "not_found" and not intruder.of("TOOL_CALL_RESULT")
        assert len(server.hub.approvals) == 1 and len(server.hub.agui) == 1  # ann's run still waits
        stored = await stored_run(server, "ann", first["threadId"])
        assert (stored.status, stored.approvals[0].status) == ("running", "pending")
        assert_agui_run(await agui_run(server, ann, resume_of(first, approve(interrupt))))
        await settle(server.hub)


async def test_only_one_request_streams_a_resumed_run():
    async with approvals_server() as server:
        token = token_for(server, "ann")
        first = run_input('[[tool:transfer {"amount": 5, "to": "bo"}]] [[tool:sleep {"ms": 600}]]')
        [interrupt] = interrupts_of(await agui_run(server, token, first))
        answers: list[Answer] = []

        async def resume() -> None:
            answers.append(await agui_run(server, token, resume_of(first, approve(interrupt))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume)
            with trio.fail_after(5):
                while len(server.hub.approvals):  # taken: the first resume streams
                    await trio.sleep(0.01)
            second = await agui_run(server, token, resume_of(first, approve(interrupt)))
            assert (second.status, second.body["code"]) == (409, "run_in_progress")
        [streamed] = answers
        assert_agui_run(streamed)
        assert json.loads(streamed.of("TOOL_CALL_RESULT")[0]["content"]) == {"sent": 5, "to": "bo"}
        await settle(server.hub)


# -- the request's other guarantees ---------------------------------------------------------------


async def test_a_client_gone_before_the_interrupt_cancels_the_run():
    async with approvals_server() as server:
        hub, token = server.hub, token_for(server, "ann")
        body = run_input(f'[[tool:sleep {{"ms": 5000}}]] {TRANSFER}')
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                async with http.stream("POST", "/agui", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                    seen = ""
                    async for text in r.aiter_text():
                        seen += text
                        if "TOOL_CALL_END" in seen:
                            break  # the client goes away while the first tool runs
            await settle(hub, timeout=3)
        run = await stored_run(server, "ann", body["threadId"])
        assert (run.status, run.cancel_reason, run.approvals) == ("cancelled", "disconnect", ())
        assert len(hub.approvals) == 0 and len(hub.agui) == 0
        assert by_label(hub.metrics.runs_affected) == {}


async def test_a_parked_run_is_cancelled_by_the_drain():
    async with approvals_server(drain_grace_s=0.3) as server:
        hub = server.hub
        [_] = interrupts_of(await agui_run(server, token_for(server, "ann"), run_input(TRANSFER)))
        assert hub.snapshot()["connections"] == 1  # parked: still one of the server's
        server.request_stop()
        with trio.fail_after(10):
            await server._stopped.wait()
        assert hub.metrics.runs_finished.labels("cancelled", "shutdown")._value.get() == 1
        assert len(hub.approvals) == 0 and len(hub.agui) == 0
        assert hub.snapshot()["connections"] == 0
