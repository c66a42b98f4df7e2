"""``netra chat`` asks y/n for a tool call that needs approval: in a real
pseudo-terminal, and with piped input (see test_terminal_client.py)."""

from __future__ import annotations

import re
import sys

import pytest
import trio

from netra.client import connect
from netra.testing import config_for_tests, open_server, token_for

from .test_approvals import TOOLS, TRANSFER
from .test_terminal_client import ROOT, SCRIPT_S, child_env, finish, in_thread, spawn_chat

# pexpect forks while the server's threads exist (see test_terminal_client.py)
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

QUESTION = "approve? [y/n, or n REASON] "
ASKS = '⚙ transfer {"amount": 5, "to": "bo"} needs your approval'


async def test_the_terminal_asks_y_or_n():
    """y runs the call, n refuses it with a reason, anything else is asked
    again; a call decided on another connection, or a run stopped with
    Ctrl-C, ends the question."""
    async with open_server(config_for_tests(), extra_tools=TOOLS) as server:
        token = token_for(server, "ann")

        async def decide_elsewhere() -> None:
            [(_, run_id, call_id)] = list(server.hub.approvals._waiting)
            async with connect(server.ws_url, token) as other:
                await other.decide(run_id, call_id, approve=True)

        def script() -> int:
            child = spawn_chat(server.ws_url, token)
            try:
                child.expect_exact("you> ")
                child.sendline(TRANSFER)
                child.expect_exact(ASKS)
                child.expect_exact(QUESTION)
                child.sendline("maybe")
                child.expect_exact("answer y or n")
                child.expect_exact(QUESTION)
                child.sendline("y")
                child.expect(re.escape('⚙ transfer {"amount": 5, "to": "bo"} → {"sent": 5, "to": "bo"} (') + r"\d+ ms\)")
                child.expect_exact("transfer returned")
                child.expect_exact("you> ")

                child.sendline(TRANSFER)
                child.expect_exact(QUESTION)
                child.sendline("n not this month")
                child.expect_exact("✗ the user declined this call: not this month")
                child.expect_exact("transfer failed: the user declined this call: not this month")
                child.expect_exact("you> ")

                child.sendline(TRANSFER)
                child.expect_exact(QUESTION)
                trio.from_thread.run(decide_elsewhere)
                child.expect_exact("(no longer waiting for this answer)")
                child.expect_exact('→ {"sent": 5, "to": "bo"}')
                child.expect_exact("you> ")

                child.sendline(TRANSFER)
                child.expect_exact(QUESTION)
                child.sendintr()
                child.expect_exact("(no longer waiting for this answer)")
                child.expect_exact("cancelled (client)")
                child.expect_exact("you> ")
                child.sendline("thanks")  # the next line is a message again, not an answer
                child.expect_exact("You said: “thanks”")
                child.expect_exact("you> ")
                child.sendintr()
                return finish(child)
            finally:
                child.close(force=True)

        assert await in_thread(script) == 0
        assert len(server.hub.approvals) == 0


async def test_piped_answers_and_the_end_of_input():
    """Piped, the line after the message answers the question; input that
    ends before an answer is a no."""
    async with open_server(config_for_tests(), extra_tools=TOOLS) as server:
        for stdin, outcome in ((f"{TRANSFER}\ny\n", '→ {"sent": 5, "to": "bo"}'),
                               (f"{TRANSFER}\n", "✗ the user declined this call: no answer (the terminal's input ended)")):
            with trio.fail_after(SCRIPT_S):
                done = await trio.run_process(
                    [sys.executable, "-m", "netra", "chat", "--url", server.ws_url, "--token", token_for(server, "bo")],
                    stdin=stdin.encode(), capture_stdout=True, capture_stderr=True, check=False,
                    env=child_env(), cwd=str(ROOT),
                )
            out = done.stdout.decode()
            assert done.returncode == 0, done.stderr.decode()
            assert ASKS in out and QUESTION in out and outcome in out, out
            assert "\x1b" not in out
