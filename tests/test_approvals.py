"""Tool calls that wait for their user's approval.

In memory under the autojump clock (timeouts take no real time), and over
real sockets with the client library. A run asks with `approval_required`,
holds no model or tool slot while it waits, and goes on as the user
decides, from any of their connections; nobody else can decide for them.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from netra.agents import Agent, AgentSet, builtin_agents
from netra.agents.runner import AgentLoop
from netra.approvals import ApprovalBoard, Approver
from netra.client import ApprovalRequired, DecisionRefused, connect
from netra.hub import Hub
from netra.store import MemoryStore
from netra.testing import config_for_tests, open_hub, open_server, token_for
from netra.tools import tool

from .conftest import settle
from ._backends import uid
from .test_store import ALL_BACKENDS, backend_named
from .test_store_e2e import RecordingModel

TERMINAL = ("agent_completed", "agent_error", "agent_cancelled")
TRANSFER = 'send it [[tool:transfer {"amount": 5, "to": "bo"}]]'


@tool(needs_approval=True, blocking=False)
def transfer(amount: int, to: str) -> dict:
    """Send money to someone.

    Args:
        amount: How much, in euros.
        to: Who gets it.
    """
    return {"sent": amount, "to": to}


@tool(needs_approval=lambda args: args["amount"] > 100, blocking=False)
def pay(amount: int) -> dict:
    """Pay a bill; large ones need a yes.

    Args:
        amount: How much, in euros.
    """
    return {"paid": amount}


@tool(needs_approval=True, concurrency=1)
async def launch(count: int) -> dict:
    """Launch rockets, one launch at a time server-wide.

    Args:
        count: How many.
    """
    return {"launched": count}


TOOLS = [transfer, pay, launch]


def hub_with_tools(**overrides):
    return open_hub(config_for_tests(**overrides), extra_tools=TOOLS)


def decision(event: dict, verdict: str = "approve", **fields) -> dict:
    return {"type": "tool_decision", "run_id": event["run_id"], "tool_call_id": event["tool_call_id"],
            "decision": verdict, **fields}


async def until_terminal(conn) -> list[dict]:
    events = []
    while not events or events[-1]["type"] not in TERMINAL:
        events.append(await conn.receive())
    return events


async def ask(conn, text: str = TRANSFER, **fields) -> dict:
    """Send a message and read its events up to its approval_required."""
    await conn.send({"type": "user_message", "text": text, **fields})
    return await conn.until("approval_required")


async def stored_run(hub, user: str, event: dict):
    [run] = (await hub.store.get_thread(user, event["thread_id"]))[2]
    return run


def outcomes(hub) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in hub.metrics.approvals.collect()
            for s in m.samples if s.name.endswith("_total")}


# -- deciding ------------------------------------------------------------------------


async def test_approved_the_call_runs_after_its_approval(autojump_clock):
    async with hub_with_tools() as server:
        hub = server.hub
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann, id="m1")
            before = [e["type"] for e in ann.received[1:]]
            assert before == ["agent_started", "agent_thinking", "approval_required"]
            assert (asked["tool"], asked["args"], asked["tool_call_id"]) == ("transfer", {"amount": 5, "to": "bo"}, "call_1")
            assert asked["expires_at_ms"] == pytest.approx(asked["ts"] + 300_000, abs=1000)
            # recorded before it was announced
            [pending] = (await stored_run(hub, "ann", asked)).approvals
            assert (pending.status, pending.tool, pending.args) == ("pending", "transfer", asked["args"])
            assert pending.expires_at == pytest.approx(asked["expires_at_ms"] / 1000, abs=0.01)
            await trio.sleep(30)  # the run waits; nothing else happens meanwhile
            await ann.send({"type": "ping", "id": "p"})
            assert (await ann.receive())["type"] == "pong" and len(hub.approvals) == 1
            await ann.send(decision(asked))
            events = await until_terminal(ann)
        types = [e["type"] for e in events]
        assert types[:2] == ["tool_executing", "tool_completed"] and types[-1] == "agent_completed"
        assert events[0]["args"] == {"amount": 5, "to": "bo"}
        assert events[1]["result"] == {"sent": 5, "to": "bo"}
        assert "transfer returned" in events[-1]["text"]
        run = await stored_run(hub, "ann", asked)
        [approval] = run.approvals
        assert (approval.status, approval.edited_args, approval.reason) == ("approved", None, None)
        assert approval.decided_at is not None and [c.args for c in run.tool_calls] == [asked["args"]]
        assert outcomes(hub) == {"approved": 1.0}
        assert len(hub.approvals) == 0
        await settle(hub)


async def test_approved_with_edited_arguments_the_call_and_the_model_use_them(autojump_clock):
    model = RecordingModel()
    async with open_hub(config_for_tests(), extra_tools=TOOLS, model=model) as server:
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            await ann.send(decision(asked, args={"amount": 3.0, "to": "cy"}))
            events = await until_terminal(ann)
        executing, completed = events[0], events[1]
        assert executing["type"] == "tool_executing" and executing["args"] == {"amount": 3.0, "to": "cy"}
        assert completed["result"] == {"sent": 3, "to": "cy"}  # checked like the model's: 3.0 is the integer 3
        # the model's next turn shows the call as it ran
        [call] = model.requests[-1].messages[-2].tool_calls
        assert json.loads(call.arguments) == {"amount": 3.0, "to": "cy"}
        run = await stored_run(server.hub, "ann", asked)
        assert run.approvals[0].edited_args == {"amount": 3.0, "to": "cy"}
        assert run.tool_calls[0].args == {"amount": 3.0, "to": "cy"}
        assert outcomes(server.hub) == {"edited": 1.0}


async def test_edited_arguments_that_do_not_fit_are_refused_and_the_call_still_waits(autojump_clock):
    async with hub_with_tools() as server:
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            await ann.send(decision(asked, args={"amount": "lots", "who": "bo"}, id="d-1"))
            refused = await ann.until("error")
            assert (refused["code"], refused["ref"]) == ("bad_request", "d-1")
            assert refused["message"] == (
                "the edited arguments do not fit transfer: missing required argument 'to'; argument 'amount' "
                "must be an integer, got string; unknown argument 'who' (known: amount, to). "
                "The call still waits for a decision."
            )
            assert "run_id" not in refused
            assert len(server.hub.approvals) == 1
            await ann.send(decision(asked, args={"amount": 1, "to": "bo"}))
            events = await until_terminal(ann)
        assert events[1]["result"] == {"sent": 1, "to": "bo"} and events[-1]["type"] == "agent_completed"


async def test_denied_the_model_gets_a_failed_call_saying_the_user_declined(autojump_clock):
    model = RecordingModel()
    async with open_hub(config_for_tests(), extra_tools=TOOLS, model=model) as server:
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            await ann.send(decision(asked, "deny", reason="not this month"))
            events = await until_terminal(ann)
        assert [e["type"] for e in events[:2]] == ["tool_executing", "tool_completed"]
        assert events[1]["error"] == "the user declined this call: not this month" and "result" not in events[1]
        assert events[-1]["type"] == "agent_completed"  # the run goes on: the model answers
        assert "transfer failed: the user declined this call: not this month" in events[-1]["text"]
        tool_message = model.requests[-1].messages[-1]
        assert (tool_message.role, json.loads(tool_message.content)) == (
            "tool", {"error": "the user declined this call: not this month"}
        )
        run = await stored_run(server.hub, "ann", asked)
        assert (run.approvals[0].status, run.approvals[0].reason) == ("denied", "not this month")
        assert run.tool_calls[0].error == "the user declined this call: not this month"
        assert outcomes(server.hub) == {"denied": 1.0}
        tools = server.hub.metrics.tool_calls.labels("transfer", "denied")._value.get()
        assert tools == 1


async def test_no_decision_in_time_is_a_denial_with_reason_timeout(autojump_clock):
    async with hub_with_tools(approval_timeout_s=60.0) as server:
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            assert asked["expires_at_ms"] == pytest.approx(asked["ts"] + 60_000, abs=1000)
            start = trio.current_time()
            events = await until_terminal(ann)
            assert trio.current_time() - start == pytest.approx(60, abs=0.5)
            await ann.send(decision(asked, id="late"))  # too late: nothing waits now
            assert (await ann.until("error"))["code"] == "not_found"
        assert events[1]["error"] == "not approved: the user did not decide in time (timeout)"
        assert events[-1]["type"] == "agent_completed"
        approval = (await stored_run(server.hub, "ann", asked)).approvals[0]
        assert (approval.status, approval.reason) == ("denied", "timeout")
        assert outcomes(server.hub) == {"timeout": 1.0}


async def test_the_wait_does_not_count_against_the_runs_time_limit(autojump_clock):
    async with hub_with_tools(run_timeout_s=10.0, scripted_delay_ms=50) as server:  # the answer after the wait streams
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            await trio.sleep(120)
            await ann.send(decision(asked))
            events = await until_terminal(ann)
            assert events[-1]["type"] == "agent_completed"
            # and the limit still holds once the run works again
            await ann.send({"type": "user_message", "text": '[[tool:transfer {"amount": 1, "to": "x"}]] [[tool:hang]]'})
            again = await ann.until("approval_required")
            await ann.send(decision(again))
            start = trio.current_time()
            ended = await until_terminal(ann)
            assert ended[-1]["type"] == "agent_error" and ended[-1]["code"] == "timeout"
            assert trio.current_time() - start == pytest.approx(10, abs=0.5)


# -- who may decide ------------------------------------------------------------------


async def test_a_decision_from_another_connection_of_the_same_user(autojump_clock):
    async with hub_with_tools() as server:
        async with server.connect(user_id="ann") as phone, server.connect(user_id="ann") as laptop:
            asked = await ask(phone)
            await laptop.send(decision(asked))
            events = await until_terminal(phone)
            assert events[1]["result"] == {"sent": 5, "to": "bo"}
            await laptop.send({"type": "ping", "id": "p"})
            await laptop.until("pong")
            # the deciding connection gets no event of a run it did not start
            assert [e["type"] for e in laptop.received] == ["connected", "pong"]


async def test_nobody_else_can_decide_and_the_run_still_waits(autojump_clock):
    async with hub_with_tools() as server:
        async with server.connect(user_id="ann") as ann, server.connect(user_id="mallory") as mallory:
            asked = await ask(ann)
            await mallory.send(decision(asked, id="steal"))
            stolen = await mallory.until("error")
            unknown_run = decision(asked, id="r")
            unknown_run["run_id"] = "run_nope"
            unknown_call = decision(asked, id="c")
            unknown_call["tool_call_id"] = "call_9"
            for wrong in (unknown_run, unknown_call):
                await ann.send(wrong)
                refused = await ann.until("error")
                assert (refused["code"], refused["ref"], refused["message"]) == (
                    "not_found", wrong["id"], stolen["message"]  # the same answer: ids do not leak
                )
            assert (stolen["code"], stolen["ref"]) == ("not_found", "steal")
            assert "run_id" not in stolen
            await trio.sleep(10)
            assert len(server.hub.approvals) == 1 and ann.received[-1]["type"] == "error"
            await ann.send(decision(asked, "deny", id="mine"))
            await ann.send(decision(asked, id="twice"))  # decided already
            await ann.send({"type": "ping", "id": "p"})
            events = []  # the run's events and the answers, in whatever interleaving
            while not any(e["type"] == "pong" for e in events) or not any(e["type"] in TERMINAL for e in events):
                events.append(await ann.receive())
            twice = [e for e in events if e["type"] == "error"]
            assert [(e["code"], e["ref"]) for e in twice] == [("not_found", "twice")]
            assert [e["type"] for e in events if e["type"] in TERMINAL] == ["agent_completed"]
        run = await stored_run(server.hub, "ann", asked)
        assert run.approvals[0].status == "denied"


# -- what a waiting run holds ---------------------------------------------------------


async def test_a_waiting_run_holds_no_model_tool_or_global_slot_but_its_user_run_slot(autojump_clock):
    """max_runs 1: another user's runs go on while ann's waits for her (a
    run waiting for its user must not hold what others need)."""
    config = dict(max_model_calls=1, max_runs_per_user=1, max_runs=1)
    async with hub_with_tools(**config) as server:
        hub = server.hub
        async with server.connect(user_id="ann") as ann, server.connect(user_id="bo") as bo:
            asked = await ask(ann, '[[tool:launch {"count": 2}]]')
            snap = hub.snapshot()
            assert (snap["model_borrowed"], snap["tools_borrowed"], snap["runs_borrowed"]) == (0, 0, 0)
            # another user's run takes the one global and model slot, twice, and completes
            events = await bo.run('[[tool:calculator {"expression": "6*7"}]]')
            assert events[-1]["type"] == "agent_completed"
            # the same tool, for another user, runs while this call waits
            other = await ask(bo, '[[tool:launch {"count": 1}]]')
            await bo.send(decision(other))
            assert (await until_terminal(bo))[1]["result"] == {"launched": 1}
            # but ann's own next run waits: her one run slot is taken
            await ann.send({"type": "user_message", "text": "and then?", "id": "second"})
            queued = await ann.until("run_queued")
            assert queued["ref"] == "second"
            await trio.sleep(5)
            assert ann.received[-1]["type"] == "run_queued"
            await ann.send(decision(asked))
            first = await until_terminal(ann)  # it took its global place back to go on
            assert first[-1]["run_id"] == asked["run_id"] and first[-1]["type"] == "agent_completed"
            second = await until_terminal(ann)
            assert second[-1]["type"] == "agent_completed" and second[-1]["run_id"] == queued["run_id"]
        await settle(hub)


async def test_cancel_while_waiting_ends_the_run_at_once(autojump_clock):
    async with hub_with_tools() as server:
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            start = trio.current_time()
            await ann.send({"type": "cancel", "run_id": asked["run_id"]})
            events = await until_terminal(ann)
            assert trio.current_time() - start < 0.1
            assert [e["type"] for e in events] == ["agent_cancelled"]  # no call ran, none to close
            assert events[0]["reason"] == "client"
            await ann.send(decision(asked, id="after"))
            assert (await ann.until("error"))["code"] == "not_found"
        run = await stored_run(server.hub, "ann", asked)
        assert (run.status, run.cancel_reason, run.approvals[0].status) == ("cancelled", "client", "cancelled")
        assert run.tool_calls == ()
        assert outcomes(server.hub) == {"cancelled": 1.0}
        assert len(server.hub.approvals) == 0
        await settle(server.hub)


async def test_a_disconnect_while_waiting_cancels_the_run(autojump_clock):
    async with hub_with_tools() as server:
        async with server.connect(user_id="ann") as ann:
            asked = await ask(ann)
            ann.client.drop()  # no close frame, and no resume window: cancelled as any run
        await settle(server.hub)
        run = await stored_run(server.hub, "ann", asked)
        assert (run.status, run.cancel_reason, run.approvals[0].status) == ("cancelled", "disconnect", "cancelled")
        assert server.hub.metrics.runs_finished.labels("cancelled", "disconnect")._value.get() == 1
        assert len(server.hub.approvals) == 0


async def test_a_dropped_resumable_session_keeps_waiting_and_the_decision_can_come_from_elsewhere(autojump_clock):
    async with hub_with_tools(resume_window_s=30.0) as server:
        async with server.connect(user_id="ann") as phone:
            connected = phone.received[0]
            asked = await ask(phone)
            phone.client.drop()  # the phone goes into a tunnel
        await trio.sleep(5)
        async with server.connect(user_id="ann") as laptop:
            await laptop.send(decision(asked))
            await laptop.send({"type": "ping", "id": "p"})
            assert (await laptop.until("pong"))["id"] == "p"
        await trio.sleep(5)
        async with server.connect(user_id="ann") as back:
            await back.send({"type": "resume", "session_id": connected["session_id"],
                             "resume_token": connected["resume_token"], "last_seq": asked["seq"]})
            await back.until("resumed")
            events = await until_terminal(back)
        assert [e["type"] for e in events[:2]] == ["tool_executing", "tool_completed"]
        assert events[-1]["type"] == "agent_completed"
        assert [e["seq"] for e in events] == list(range(asked["seq"] + 1, asked["seq"] + 1 + len(events)))


# -- which calls ask ------------------------------------------------------------------


async def test_a_predicate_asks_only_for_the_calls_it_names(autojump_clock):
    async with hub_with_tools() as server:
        async with server.connect(user_id="ann") as ann:
            small = await ann.run('[[tool:pay {"amount": 20}]]')
            assert "approval_required" not in [e["type"] for e in small]
            assert small[-1]["type"] == "agent_completed"
            asked = await ask(ann, '[[tool:pay {"amount": 500}]]')
            assert asked["args"] == {"amount": 500}
            await ann.send(decision(asked))
            assert (await until_terminal(ann))[1]["result"] == {"paid": 500}
            # arguments that do not fit fail as any call would, without asking anyone
            bad = await ann.run('[[tool:pay {"amount": "all"}]]')
            assert "approval_required" not in [e["type"] for e in bad]
            assert [e["error"] for e in bad if e["type"] == "tool_completed"] == [
                "argument 'amount' must be an integer, got string"
            ]


async def test_an_agent_may_ask_for_a_tool_that_does_not_ask_by_itself(autojump_clock):
    careful = Agent(name="careful", description="Careful.", instructions="Ask first.",
                    tools=("calculator",), approvals={"calculator": True})
    agents = AgentSet.of([builtin_agents()["assistant"], careful], default="assistant")
    async with open_hub(config_for_tests(), agents=agents) as server:
        async with server.connect(user_id="ann") as ann:
            plain = await ann.run('[[tool:calculator {"expression": "1+1"}]]')
            assert "approval_required" not in [e["type"] for e in plain]
            asked = await ask(ann, '[[tool:calculator {"expression": "6*7"}]]', agent="careful")
            assert asked["tool"] == "calculator"
            await ann.send(decision(asked, args={"expression": "6*8"}))
            assert (await until_terminal(ann))[1]["result"] == 48


# -- over real sockets, with the client library -----------------------------------------


async def test_the_client_library_approves_denies_and_reports_refusals():
    async with open_server(config_for_tests(), extra_tools=TOOLS) as server:
        token = token_for(server, "ann")
        with trio.fail_after(20):
            async with connect(server.ws_url, token) as phone, connect(server.ws_url, token) as laptop:
                seen = []
                async for event in phone.run(TRANSFER):
                    seen.append(event.type)
                    if isinstance(event.event, ApprovalRequired):
                        asked = event.event
                        with pytest.raises(DecisionRefused) as bad:
                            await laptop.decide(asked.run_id, asked.tool_call_id, approve=True, args={"amount": -1})
                        assert bad.value.code == "bad_request" and "missing required argument 'to'" in bad.value.message
                        await laptop.decide(asked.run_id, asked.tool_call_id, approve=True, args={"amount": 2, "to": "cy"})
                        with pytest.raises(DecisionRefused) as twice:
                            await phone.decide(asked.run_id, asked.tool_call_id, approve=False)
                        assert twice.value.code == "not_found"
                    if event.type == "tool_completed":
                        assert event.raw["result"] == {"sent": 2, "to": "cy"}
                assert seen[-1] == "agent_completed" and "approval_required" in seen
                denied = []
                async for event in phone.run(TRANSFER):
                    if event.type == "approval_required":
                        await phone.decide(event.raw["run_id"], event.raw["tool_call_id"], approve=False, reason="no")
                    denied.append(event)
                assert [e.raw.get("error") for e in denied if e.type == "tool_completed"] == [
                    "the user declined this call: no"
                ]
            async with connect(server.ws_url, token_for(server, "mallory")) as mallory:
                with pytest.raises(DecisionRefused) as foreign:
                    await mallory.decide("run_x", "call_1", approve=True)
                assert foreign.value.code == "not_found"
        await settle(server.hub)


# -- kept, and shown in the thread's history ----------------------------------------------


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request, tmp_path):
    return backend_named(request, request.param, tmp_path)


async def test_approvals_are_in_the_threads_history(any_backend):
    """Over real sockets on every store: the pending approval is in the
    thread as soon as it is announced, and the decision once made."""
    config = config_for_tests(database_url=any_backend.url, store_pool_size=4)
    store = MemoryStore() if any_backend.name == "memory" else "config"
    async with (
        open_server(config, extra_tools=TOOLS, store=store) as server,
        httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
    ):
        token = token_for(server, uid("ann"))  # the PostgreSQL database is the session's: a user of its own
        auth = {"Authorization": f"Bearer {token}"}
        with trio.fail_after(30):
            async with connect(server.ws_url, token) as conn:
                thread_id = None
                async for event in conn.run(TRANSFER):
                    if event.type == "approval_required":
                        thread_id = event.raw["thread_id"]
                        shown = (await http.get(f"/api/threads/{thread_id}", headers=auth)).json()
                        [run] = shown["runs"]
                        assert run["status"] == "running"
                        [pending] = run["approvals"]
                        assert pending == {
                            "run_id": run["id"], "thread_id": thread_id, "tool_call_id": "call_1",
                            "tool": "transfer", "args": {"amount": 5, "to": "bo"}, "status": "pending",
                            "requested_at": pending["requested_at"],
                            "expires_at": pytest.approx(event.raw["expires_at_ms"] / 1000, abs=0.01),
                            "decided_at": None, "edited_args": None, "reason": None,
                        }
                        await conn.decide(run["id"], "call_1", approve=True, args={"amount": 4, "to": "bo"})
                async for event in conn.run(TRANSFER, thread_id=thread_id):
                    if event.type == "approval_required":
                        await conn.decide(event.raw["run_id"], "call_1", approve=False, reason="enough")
            shown = (await http.get(f"/api/threads/{thread_id}", headers=auth)).json()
        approved, denied = (run["approvals"] for run in shown["runs"])
        assert [(a["status"], a["edited_args"], a["reason"]) for a in approved] == [
            ("approved", {"amount": 4, "to": "bo"}, None)
        ]
        assert [(a["status"], a["edited_args"], a["reason"]) for a in denied] == [("denied", None, "enough")]
        assert all(a["decided_at"] >= a["requested_at"] for a in approved + denied)
        assert shown["runs"][0]["tool_calls"][0]["args"] == {"amount": 4, "to": "bo"}
        assert shown["runs"][1]["tool_calls"][0]["error"] == "the user declined this call: enough"
        other = (await http.get(f"/api/threads/{thread_id}",
                                headers={"Authorization": f"Bearer {token_for(server, uid('mallory'))}"}))
        assert other.status_code == 404
        await settle(server.hub)


# -- refusals nobody asked for ------------------------------------------------------------


async def test_a_call_nobody_can_be_asked_about_is_refused_not_declined(autojump_clock):
    """An agent loop run without an approver (an embedding that cannot ask
    anyone), and a model that gives two waiting calls one id: the call is
    refused in netra's words, never as if the user had declined it."""
    hub = Hub.build(config_for_tests(), extra_tools=TOOLS)
    agent = hub.agents["assistant"]
    events = []
    loop = AgentLoop(
        run_id="r", thread_id="t", message_id="m", agent=agent, model=hub.model,
        tools=hub.agent_tools["assistant"], specs=hub.agent_specs["assistant"], limits=hub.run_limits(agent),
        emit=events.append, model_limiter=trio.CapacityLimiter(1), tool_limiters={},
    )
    answer = await loop.execute([], TRANSFER)
    [completed] = [e for e in events if e.type == "tool_completed"]
    assert completed.error == "not approved: it needs the user's approval and nobody can be asked"
    assert "transfer failed: not approved" in answer

    store = MemoryStore()
    await store.open()
    board = ApprovalBoard()
    approver = Approver(board=board, store=store, user_id="u", run_id="r", thread_id="t",
                        scope=trio.CancelScope(), emit=events.append, timeout_s=5.0)
    board._open(("u", "r", "call_1"), transfer)
    twice = await approver("call_1", transfer, {"amount": 1, "to": "x"})
    assert twice.refusal() == "not approved: another call with this id already waits"
    assert len(board) == 1  # the first one still waits


async def test_a_drain_cancels_a_waiting_run_after_its_grace():
    async with open_server(config_for_tests(drain_grace_s=0.3, close_timeout_s=1.0), extra_tools=TOOLS) as server:
        with trio.fail_after(15):
            async with connect(server.ws_url, token_for(server, "ann")) as conn:
                events = []
                async for event in conn.run(TRANSFER):
                    events.append(event)
                    if event.type == "approval_required":
                        server.request_stop()
                assert events[-1].type == "agent_cancelled" and events[-1].raw["reason"] == "shutdown"
                assert "tool_executing" not in [e.type for e in events]
                assert (await conn.wait_closed()).code == 1001
            await server._stopped.wait()
        assert len(server.hub.approvals) == 0
