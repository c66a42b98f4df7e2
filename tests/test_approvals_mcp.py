"""An MCP server's tool that an agent asks approval for (tests/mcp_server.py
over stdio): shown by its label, as its tool_executing is, and edited
arguments checked with the server's own JSON schema."""

from __future__ import annotations

import trio

from netra.agents import Agent, AgentSet, builtin_agents
from netra.testing import config_for_tests, open_hub
from tests.mcp_server import stdio_command

from .test_approvals import decision, until_terminal


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
