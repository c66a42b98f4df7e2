"""netra's ``/agui`` read by the official AG-UI client: ``@ag-ui/client``'s
``HttpAgent``, from npm (tests/agui_js), against a real server on a real
socket. The client parses the stream, verifies its sequence and validates
every event with the protocol's own schemas; what it hands its subscriber is
what a CopilotKit-style front end would see.

Skipped, with the reason, only when node or npm is not installed; the
package is installed here when ``make test`` has not done it already.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from netra.testing import config_for_tests, open_server, token_for

from .conftest import by_label, settle
from .test_agui import validate
from .test_approvals import TOOLS, TRANSFER

AGUI_JS = Path(__file__).parent / "agui_js"
PLAIN, TOOL, FAILING = "hello", 'what is [[tool:calculator {"expression": "6*7"}]]', "try [[tool:fail {}]]"
REASONING = ["REASONING_START", "REASONING_MESSAGE_START", "REASONING_MESSAGE_CONTENT",
             "REASONING_MESSAGE_END", "REASONING_END"]
TOOL_CALL = ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT"]


@pytest.fixture(scope="session")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        pytest.skip(f"the official AG-UI client runs on Node.js, and {missing} is not installed")
    installed_lock = AGUI_JS / "node_modules" / ".package-lock.json"
    if not (AGUI_JS / "node_modules" / "@ag-ui" / "client").is_dir() or (
        installed_lock.stat().st_mtime < (AGUI_JS / "package-lock.json").stat().st_mtime
    ):  # as .ci/install-agui-js (make test) decides
        installed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=AGUI_JS, capture_output=True, text=True, timeout=600,
        )
        assert installed.returncode == 0, f"npm ci failed in {AGUI_JS}:\n{installed.stderr[-3000:]}"
    return node


async def client(
    node: str, server: Any, scenario: str, token: str, *texts: str, responses: list[Any] | None = None
) -> tuple[dict[str, Any], str]:
    """Run tests/agui_js/run.mjs: what the client parsed, and what it printed on stderr."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [node, str(AGUI_JS / "run.mjs"), scenario, f"{server.http_url}/agui", token, *texts],
            capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "RESPONSES": json.dumps(responses or [])},
        )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    return json.loads(done.stdout), stderr


def types(run: dict[str, Any]) -> list[str]:
    return [e["type"] for e in run["events"]]


async def test_the_official_client_reads_answers_tool_calls_and_failing_tools(node, server):
    token = token_for(server, "alice")
    out, stderr = await client(node, server, "run", token, PLAIN, TOOL, FAILING)
    assert "[ag-ui]" not in stderr, stderr  # nothing stripped, dropped or translated by the client
    plain, tool, failing = out["runs"]
    for run in out["runs"]:
        assert run["error"] is None
        assert types(run)[0] == "RUN_STARTED" and types(run)[-1] == "RUN_FINISHED"
        assert all(e["threadId"] == out["threadId"] for e in run["events"] if "threadId" in e)

    assert types(plain) == [
        "RUN_STARTED", "CUSTOM", "STEP_STARTED", *REASONING,
        "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "STEP_FINISHED", "RUN_FINISHED",
    ]
    assert types(tool) == [
        "RUN_STARTED", "CUSTOM", "STEP_STARTED", *REASONING, *TOOL_CALL, "STEP_FINISHED",
        "STEP_STARTED", *REASONING, "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "STEP_FINISHED", "RUN_FINISHED",
    ]
    assert types(failing) == types(tool)
    result = next(e for e in failing["events"] if e["type"] == "TOOL_CALL_RESULT")
    assert json.loads(result["content"]) == {"error": "RuntimeError: chaos: fail"}

    # the client's own record of the conversation: netra's answers, one thread
    messages = out["messages"]
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert [m["role"] for m in messages if m["role"] in ("user", "assistant", "tool")] == [
        "user", "assistant", "user", "assistant", "tool", "user", "assistant", "tool",
    ]
    [call] = assistant[1]["toolCalls"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "6*7"}
    assert next(m for m in messages if m.get("toolCallId") == call["id"])["content"] == "42"
    _, stored, _ = await server.hub.store.get_thread("alice", out["threadId"])
    assert [m.text for m in stored if m.role == "assistant"] == [m["content"] for m in assistant]
    await settle(server.hub)


async def test_the_official_clients_abort_cancels_the_run_on_the_server(node, server):
    out, _ = await client(node, server, "abort", token_for(server, "alice"), "[[tool:hang {}]]")
    [run] = out["runs"]
    assert types(run) == ["RUN_STARTED", "CUSTOM", "STEP_STARTED", *REASONING, *TOOL_CALL[:3], "RUN_ERROR"]
    assert run["events"][-1]["code"] == "abort"  # the client's own ending of an aborted request
    await settle(server.hub, timeout=5)
    _, _, runs = await server.hub.store.get_thread("alice", out["threadId"])
    assert [(r.status, r.cancel_reason) for r in runs] == [("cancelled", "disconnect")]
    assert by_label(server.hub.metrics.runs_affected) == {}


async def test_the_official_client_reports_a_bad_token(node, server):
    out, _ = await client(node, server, "run", "not-a-token", PLAIN)
    [run] = out["runs"]
    assert run["events"] == []
    assert run["error"]["status"] == 401
    assert run["error"]["payload"] == {"code": "unauthorized", "message": "invalid token"}
    assert server.hub.snapshot()["runs_borrowed"] == 0


async def test_the_official_client_reads_an_interrupt_and_resumes_the_run(node):
    """A call that needs approval: the client gets RUN_FINISHED with the
    interrupt outcome and keeps the interrupt as pending; it resumes with
    its own buildResumeArray, the first time with edited arguments, and
    reads the rest of the same run, to its end, without a warning."""
    async with open_server(config_for_tests(), extra_tools=TOOLS) as server:
        twice = f'{TRANSFER} and [[tool:transfer {{"amount": 9, "to": "cy"}}]]'
        out, stderr = await client(node, server, "approve", token_for(server, "ann"), twice, responses=[
            {"status": "resolved", "payload": {"approve": True, "args": {"amount": 4, "to": "bo"}}},
            {"status": "cancelled"},
        ])
        assert stderr == "", stderr  # nothing the client warned about, dropped or could not apply
        paused, again, done = out["runs"]
        for run in out["runs"]:
            assert run["error"] is None
            validate(run["events"])
            assert types(run)[0] == "RUN_STARTED" and types(run)[-1] == "RUN_FINISHED"
        assert len({run["events"][0]["runId"] for run in out["runs"]}) == 3  # three AG-UI runs of one netra run
        assert len({run["events"][0]["metadata"]["netra"]["run_id"] for run in out["runs"]}) == 1

        # the first ends at the call, asking: the client parsed the outcome and holds the interrupt
        assert types(paused)[-5:] == [*TOOL_CALL[:3], "STEP_FINISHED", "RUN_FINISHED"]
        [interrupt] = paused["finished"]["interrupts"]
        assert paused["finished"]["outcome"] == "interrupt"
        assert paused["pendingInterrupts"] == [interrupt]
        assert interrupt["reason"] == "tool_approval" and interrupt["toolCallId"].endswith(".call_1")
        # resumed with the edit: the call's result, then the next call asks
        assert again["finished"]["outcome"] == "interrupt"
        [second] = again["pendingInterrupts"]
        assert second["toolCallId"].endswith(".call_2")
        assert json.loads(next(e for e in again["events"] if e["type"] == "TOOL_CALL_RESULT")["content"]) == {
            "sent": 4, "to": "bo"}
        # cancelled: the call is refused, the run answers and finishes; nothing is pending
        assert done["finished"] == {"outcome": "success", "interrupts": None}
        assert done["pendingInterrupts"] == []

        # the client's own record of the conversation: one answer message with both calls and their results
        messages = [m for m in out["messages"] if m["role"] != "reasoning"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
        answer = messages[1]
        assert [c["id"] for c in answer["toolCalls"]] == [interrupt["toolCallId"], second["toolCallId"]]
        assert json.loads(messages[2]["content"]) == {"sent": 4, "to": "bo"}
        assert json.loads(messages[3]["content"]) == {"error": "the user declined this call"}
        _, stored, [run] = await server.hub.store.get_thread("ann", out["threadId"])
        assert answer["content"] == stored[-1].text
        assert [a.status for a in run.approvals] == ["approved", "denied"]
        await settle(server.hub)
