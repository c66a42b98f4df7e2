"""``netra chat`` in a real pseudo-terminal against a real server.

The server runs in this test's trio loop; the client is a separate process
(``python -m netra chat``) driven by pexpect from a worker thread, so the
loop keeps serving while the thread waits for output. Every pexpect wait has
its own timeout, which is what bounds the thread.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import httpx
import pytest
import trio

from netra.testing import config_for_tests, open_server, token_for
from netra.tools import tool

pexpect = pytest.importorskip("pexpect", reason="the pexpect package is not installed")

# pexpect forks (forkpty) while the server's threads exist; the child only
# sets up its terminal and execs Python, touching no lock another thread may hold.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
CALC = 'what is [[tool:calculator {"expression": "6*7"}]]'
STEP_S = 10  # each expect
SCRIPT_S = 60  # backstop for a whole script


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETRA_")}
    env.update(PYTHONPATH=str(ROOT), TERM="xterm", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    return env


def spawn_chat(url: str, token: str):
    return pexpect.spawn(
        sys.executable,
        ["-m", "netra", "chat", "--url", url, "--token", token],
        env=child_env(),
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=STEP_S,
        dimensions=(40, 200),
    )


def finish(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


async def in_thread(fn, *args):
    with trio.fail_after(SCRIPT_S):
        return await trio.to_thread.run_sync(fn, *args)


async def test_exchange_cancel_and_quit(tmp_path):
    """One exchange with its progress line, a Ctrl-C that cancels a long run,
    a message that continues the same thread, then Ctrl-C at the prompt."""
    config = config_for_tests(database_url=f"sqlite:///{tmp_path / 'netra.sqlite3'}", scripted_delay_ms=20)
    async with open_server(config) as server:
        token = token_for(server, "alice")

        def script() -> int:
            child = spawn_chat(server.ws_url, token)
            try:
                child.expect_exact("connected as alice")
                child.expect_exact("you> ")
                child.sendline(CALC)
                child.expect_exact("… thinking (step 1): I need the calculator tool")
                child.expect(re.escape('⚙ calculator {"expression": "6*7"} → 42 (') + r"\d+ ms\)")
                child.expect_exact("assistant> ")
                child.expect_exact("calculator returned 42.")
                child.expect_exact("you> ")
                child.sendline('[[tool:sleep {"ms": 20000}]]')
                child.expect_exact('⚙ sleep {"ms": 20000} …')
                child.sendintr()
                child.expect_exact("cancelling… (Ctrl-C again to quit)")
                child.expect_exact("cancelled (client)")
                child.expect_exact("you> ")
                child.sendline("thanks")
                child.expect_exact("You said: “thanks”")
                child.expect_exact("you> ")
                child.sendintr()  # at the prompt: quit
                return finish(child)
            finally:
                child.close(force=True)

        assert await in_thread(script) == 0
        threads = await server.hub.store.list_threads("alice")
        assert len(threads) == 1  # the three messages continued one conversation
        _, messages, runs = await server.hub.store.get_thread("alice", threads[0].id)
        assert [r.status for r in runs] == ["completed", "cancelled", "completed"]
        assert runs[1].cancel_reason == "client"


async def test_second_ctrl_c_quits_while_cancelling():
    release = trio.Event()

    @tool
    async def stubborn() -> str:
        """Finishes its work even when cancelled (so the cancel takes a while)."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(20):
                await release.wait()
        return "done"

    async with open_server(config_for_tests(), extra_tools=[stubborn]) as server:
        token = token_for(server, "bob")

        def script() -> int:
            child = spawn_chat(server.ws_url, token)
            try:
                child.expect_exact("you> ")
                child.sendline("[[tool:stubborn {}]]")
                child.expect_exact("⚙ stubborn {} …")
                child.sendintr()
                child.expect_exact("cancelling…")
                child.sendintr()
                return finish(child)
            finally:
                child.close(force=True)

        try:
            assert await in_thread(script) == 0
        finally:
            release.set()


async def test_server_shutdown_is_reported_with_its_close_code():
    async with open_server(config_for_tests(drain_grace_s=0.1)) as server:
        token = token_for(server, "dora")

        def script() -> int:
            child = spawn_chat(server.ws_url, token)
            try:
                child.expect_exact("you> ")
                trio.from_thread.run_sync(server.request_stop)
                child.expect_exact("the server is shutting down or restarting")
                child.expect_exact("(1001: server shutting down)")
                return finish(child)
            finally:
                child.close(force=True)

        assert await in_thread(script) == 1


async def test_piped_input_runs_then_exits():
    """Not a terminal: every progress update is a line of its own, and EOF
    quits once the message before it has been answered."""
    async with open_server(config_for_tests()) as server:
        with trio.fail_after(SCRIPT_S):
            done = await trio.run_process(
                [sys.executable, "-m", "netra", "chat", "--url", server.ws_url, "--token", token_for(server, "carol")],
                stdin=(CALC + "\n").encode(), capture_stdout=True, capture_stderr=True, check=False,
                env=child_env(), cwd=str(ROOT),
            )
        out = done.stdout.decode()
        assert done.returncode == 0, done.stderr.decode()
        lines = out.splitlines()
        assert any(line.startswith("… thinking (step 1)") for line in lines), out
        assert '⚙ calculator {"expression": "6*7"} …' in lines
        assert any(re.fullmatch(r'⚙ calculator \{"expression": "6\*7"\} → 42 \(\d+ ms\)', line) for line in lines), out
        assert any(line.startswith("you> assistant> Here is what I found") or line.startswith("assistant> ") for line in lines), out
        assert "\x1b" not in out  # no terminal control codes in a pipe


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param([], "netra token --user", id="no-token"),
        pytest.param(["--token", "x", "--url", "http://localhost:1/ws"], "ws:// or wss://", id="not-ws-url"),
    ],
)
async def test_usage_mistakes_exit_2(args, expected):
    with trio.fail_after(SCRIPT_S):
        done = await trio.run_process(
            [sys.executable, "-m", "netra", "chat", *args],
            capture_stdout=True, capture_stderr=True, check=False, env=child_env(), cwd=str(ROOT),
            stdin=b"",
        )
    assert done.returncode == 2
    assert expected in done.stderr.decode()
    assert "NETRA_JWT_SECRET" in done.stderr.decode() or expected != "netra token --user"


async def test_refused_token_exits_1_with_the_reason():
    async with open_server(config_for_tests()) as server:
        with trio.fail_after(SCRIPT_S):
            done = await trio.run_process(
                [sys.executable, "-m", "netra", "chat", "--url", server.ws_url, "--token", "not-a-jwt"],
                capture_stdout=True, capture_stderr=True, check=False, env=child_env(), cwd=str(ROOT),
                stdin=b"",
            )
    assert done.returncode == 1
    assert "netra chat: the server refused the connection: 401 unauthorized" in done.stderr.decode()


async def test_slash_commands_are_answered_locally_and_never_sent(tmp_path):
    """/help lists the commands; an unknown one (or a known one with
    arguments) is answered here and nothing reaches the server; // sends a
    message that begins with /."""
    config = config_for_tests(database_url=f"sqlite:///{tmp_path / 'netra.sqlite3'}")
    async with open_server(config) as server:
        token = token_for(server, "erin")

        def script() -> int:
            child = spawn_chat(server.ws_url, token)
            try:
                child.expect_exact("/help lists the commands.")
                child.expect_exact("you> ")
                child.sendline("/help")
                child.expect_exact("commands:")
                for command in ("/help", "/new", "/quit, /exit", "//text"):
                    child.expect_exact(command)
                child.expect_exact("you> ")
                child.sendline("/foo bar")
                child.expect_exact("unknown command /foo; nothing was sent (/help lists the commands)")
                child.expect_exact("you> ")
                child.sendline("/new please")
                child.expect_exact("/new takes no arguments; nothing was sent")
                child.expect_exact("you> ")
                child.sendline("//etc is a folder")
                child.expect_exact("You said: “/etc is a folder”")
                child.expect_exact("you> ")
                child.sendline("/quit")
                return finish(child)
            finally:
                child.close(force=True)

        assert await in_thread(script) == 0
        (thread,) = await threads_of(server, token)
        async with httpx.AsyncClient(base_url=server.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
            with trio.fail_after(10):
                body = (await http.get(f"/api/threads/{thread['id']}")).json()
        assert [m["text"] for m in body["messages"] if m["role"] == "user"] == ["/etc is a folder"]
        assert len(body["runs"]) == 1


async def threads_of(server, token: str) -> list[dict]:
    """The user's threads, read back through the threads API."""
    async with httpx.AsyncClient(base_url=server.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
        with trio.fail_after(10):
            response = await http.get("/api/threads")
    assert response.status_code == 200, response.text
    return response.json()["threads"]


async def test_piped_slash_commands_are_answered_locally_too(tmp_path):
    config = config_for_tests(database_url=f"sqlite:///{tmp_path / 'netra.sqlite3'}")
    async with open_server(config) as server:
        token = token_for(server, "finn")
        with trio.fail_after(SCRIPT_S):
            done = await trio.run_process(
                [sys.executable, "-m", "netra", "chat", "--url", server.ws_url, "--token", token],
                stdin=b"/help\n/nope\n", capture_stdout=True, capture_stderr=True, check=False,
                env=child_env(), cwd=str(ROOT),
            )
        out = done.stdout.decode()
        assert done.returncode == 0, done.stderr.decode()
        assert "  /new           start a new conversation" in out.splitlines()
        assert "unknown command /nope; nothing was sent (/help lists the commands)" in out
        assert await threads_of(server, token) == []  # no message reached the server


async def test_an_unreachable_server_exits_1_with_one_line():
    with trio.socket.socket() as sock:  # a port that was free a moment ago
        await sock.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
    with trio.fail_after(SCRIPT_S):
        done = await trio.run_process(
            [sys.executable, "-m", "netra", "chat", "--url", url, "--token", "x"],
            capture_stdout=True, capture_stderr=True, check=False, env=child_env(), cwd=str(ROOT), stdin=b"",
        )
    assert done.returncode == 1
    assert done.stderr.decode() == f"netra chat: could not connect to {url}: connection refused\n"
