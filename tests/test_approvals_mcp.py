"""MCP servers' tools that ask their user's approval (tests/mcp_server.py
over stdio): by an agent's word, shown by their label and with edited
arguments checked by the server's own JSON schema; and by the server's
``needs_approval`` setting (every tool, a list, the annotation modes),
which an agent's word still overrides."""

from __future__ import annotations

import logging
from typing import Any

import trio

from netra.agents import Agent, AgentSet, builtin_agents
from netra.testing import MemoryConnection, config_for_tests, open_hub
from tests.mcp_server import stdio_command

from .test_approvals import TERMINAL, decision, until_terminal


async def test_an_agent_asks_approval_for_an_mcp_tool_and_edits_are_checked_by_its_schema():
    clerk = Agent(name="clerk", description="Picks.", instructions="Pick.", tools=("test.pick",),
                  approvals={"test.pick": True})
    agents = AgentSet.of([builtin_agents()["assistant"], clerk])
    config = config_for_tests(mcp_servers={"test": {"command": stdio_command()}})
    with trio.fail_after(90):
        async with open_hub(config, agents=agents) as served:
            async with served.connect(user_id="ann") as conn:
                await conn.send({"type": "user_message", "agent": "clerk",
                                 "text": '[[tool:test__pick {"count": 2, "colour": "red"}]]'})
                asked = await conn.until("approval_required")
                assert (asked["tool"], asked["args"]) == ("test.pick", {"count": 2, "colour": "red"})
                await conn.send(decision(asked, args={"count": 9, "colour": "purple"}, id="d"))
                refused = await conn.until("error")
                assert (refused["code"], refused["ref"]) == ("bad_request", "d")
                assert refused["message"].startswith("the edited arguments do not fit test.pick: ")
                assert "argument 'count': 9 is greater than the maximum of 5" in refused["message"]
                await conn.send(decision(asked, args={"count": 3, "colour": "blue"}))
                events = await until_terminal(conn)
            executing, done = events[0], events[1]
            assert (executing["tool"], executing["args"]) == ("test.pick", {"count": 3, "colour": "blue"})
            assert done["result"] == {"count": 3, "colour": "blue", "note": ""}
            assert events[-1]["type"] == "agent_completed"
            [run] = (await served.hub.store.get_thread("ann", asked["thread_id"]))[2]
            [approval] = run.approvals
            assert (approval.tool, approval.status, approval.edited_args) == (
                "test.pick", "approved", {"count": 3, "colour": "blue"}
            )


# -- the server's needs_approval ------------------------------------------------------


async def call(
    conn: MemoryConnection, tool: str, args: str = "{}", *, verdict: str = "approve", **fields: Any
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run one message that calls ``tool``, answering its approval_required
    (if any) with ``verdict``: (the approval_required or None, the
    tool_completed). The run must complete: a refused call does not end it."""
    await conn.send({"type": "user_message", "text": f"[[tool:{tool} {args}]]", **fields})
    asked, events = None, []
    while not events or events[-1]["type"] not in TERMINAL:
        event = await conn.receive()
        assert event["type"] != "error", event
        if event["type"] == "approval_required":
            assert asked is None, "asked twice for one call"
            asked = event
            await conn.send(decision(event, verdict, reason="not now" if verdict == "deny" else None))
        events.append(event)
    assert events[-1]["type"] == "agent_completed", events[-1]
    (done,) = [e for e in events if e["type"] == "tool_completed"]
    return asked, done


def servers(**needs_approval: Any) -> dict[str, Any]:
    """The test server under each name, with that needs_approval."""
    return {name: {"command": stdio_command(), "needs_approval": v} for name, v in needs_approval.items()}


async def test_a_server_whose_tools_all_need_approval_asks_before_each_call():
    config = config_for_tests(mcp_servers=servers(test=True))
    with trio.fail_after(90):
        async with open_hub(config) as served, served.connect(user_id="ann") as conn:
            approved, done = await call(conn, "test__add", '{"a": 2, "b": 3}')
            assert approved is not None and (approved["tool"], approved["args"]) == ("test.add", {"a": 2, "b": 3})
            assert (done["tool"], done["result"], done.get("error")) == ("test.add", {"result": 5}, None)

            # every tool, read-only ones too: true means true
            denied, done = await call(conn, "test__peek", '{"key": "k"}', verdict="deny")
            assert denied is not None and denied["tool"] == "test.peek"
            assert done.get("result") is None and done["error"] == "the user declined this call: not now"

            recorded = []
            for asked in (approved, denied):
                runs = (await served.hub.store.get_thread("ann", asked["thread_id"]))[2]
                recorded += [(a.tool, a.status, a.reason) for r in runs for a in r.approvals]
            assert recorded == [("test.add", "approved", None), ("test.peek", "denied", "not now")]


async def test_a_list_or_the_annotations_choose_which_tools_ask(caplog):
    """``listed`` names erase (and, wrongly, ``listed.add`` and a tool it does
    not have: warned of); ``marked`` follows the annotations, destructive
    tools asking; ``strict`` asks for every tool not marked read-only."""
    config = config_for_tests(mcp_servers=servers(
        listed=["erase", "listed.add", "nope"], marked="destructive", strict="writes",
    ))  # fmt: skip
    asking: dict[str, bool] = {}
    with trio.fail_after(120), caplog.at_level(logging.WARNING, logger="netra.mcp"):
        async with open_hub(config) as served, served.connect(user_id="ann") as conn:
            for tool, args in [
                ("listed__erase", '{"key": "k"}'), ("listed__add", '{"a": 1, "b": 1}'), ("listed__peek", '{"key": "k"}'),
                ("marked__peek", '{"key": "k"}'), ("marked__erase", '{"key": "k"}'),
                ("marked__append", '{"text": "t"}'), ("marked__add", '{"a": 1, "b": 1}'),
                ("strict__peek", '{"key": "k"}'), ("strict__append", '{"text": "t"}'),
            ]:  # fmt: skip
                asked, done = await call(conn, tool, args)
                assert done.get("error") is None, done
                asking[done["tool"]] = asked is not None
            assert done["result"] == {"result": "appended: t"}
    assert asking == {
        "listed.erase": True, "listed.add": False, "listed.peek": False,
        # read-only runs, destructive asks, additive runs, one that says nothing asks
        "marked.peek": False, "marked.erase": True, "marked.append": False, "marked.add": True,
        "strict.peek": False, "strict.append": True,
    }
    warned = [r.getMessage() for r in caplog.records if "needs_approval" in r.getMessage()]
    assert "mcp_servers.listed.needs_approval names nope, which the server does not offer" in warned
    assert (
        "mcp_servers.listed.needs_approval names listed.add, which the server does not offer "
        "(name it as the server does: add)"
    ) in warned


async def test_an_agents_own_word_wins_over_its_servers_needs_approval():
    clerk = Agent(name="clerk", description="Tidies.", instructions="Tidy.", tools=("test.erase", "test.peek"),
                  approvals={"test.erase": False, "test.peek": True})  # fmt: skip
    agents = AgentSet.of([builtin_agents()["assistant"], clerk])
    config = config_for_tests(mcp_servers=servers(test="destructive"))
    with trio.fail_after(90):
        async with open_hub(config, agents=agents) as served, served.connect(user_id="ann") as conn:
            asked, done = await call(conn, "test__erase", '{"key": "k"}', agent="clerk")
            assert asked is None and done["result"] == {"result": "k: erased"}
            asked, done = await call(conn, "test__peek", '{"key": "k"}', agent="clerk")
            assert asked is not None and done["result"] == {"result": "k: 42"}
            # another agent, with no word of its own, follows the server
            asked, _ = await call(conn, "test__erase", '{"key": "k"}', agent="assistant")
            assert asked is not None and asked["tool"] == "test.erase"
            asked, _ = await call(conn, "test__peek", '{"key": "k"}', agent="assistant")
            assert asked is None
