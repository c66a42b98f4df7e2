"""Graceful drain: runs get a grace period, the rest are cancelled with
reason ``shutdown``, every client gets close 1001, and the process exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import trio

from netra.client import connect
from netra.testing import TEST_SECRET, config_for_tests, open_server, token_for

from .test_isolation import HANG, until


async def test_drain_lets_short_runs_finish_and_cancels_the_rest():
    async with open_server(config_for_tests(drain_grace_s=0.5, close_timeout_s=1.0)) as server:
        with trio.fail_after(15):
            async with connect(server.ws_url, token_for(server, "quick")) as quick, \
                    connect(server.ws_url, token_for(server, "long")) as long, \
                    connect(server.ws_url, token_for(server, "idle")) as idle:
                short_run = quick.run('[[tool:sleep {"ms": 200}]]')
                long_run = long.run(HANG)
                await until(short_run, "tool_executing")
                await until(long_run, "tool_executing")
                server.request_stop()
                short_rest = [e async for e in short_run]
                long_rest = [e async for e in long_run]
                assert short_rest[-1].type == "agent_completed"
                assert long_rest[-1].type == "agent_cancelled" and long_rest[-1].raw["reason"] == "shutdown"
                for conn in (quick, long, idle):
                    assert (await conn.wait_closed()).code == 1001
            with trio.fail_after(5):
                await server._stopped.wait()


async def test_sigterm_drains_and_exits_zero(tmp_path):
    import netra

    root = os.path.dirname(os.path.dirname(os.path.abspath(netra.__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "NETRA_JWT_SECRET": TEST_SECRET,
        "NETRA_DATABASE_URL": "none",
        "NETRA_CHAOS_TOOLS": "1",
        "NETRA_DRAIN_GRACE_S": "0.3",
        "NETRA_HEARTBEAT_INTERVAL_S": "5",
    }
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "netra", "serve", "--port", "0"],
        env=env, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    try:
        with trio.fail_after(20):
            seen = b""
            while b"WebSocket: " not in seen or not seen.endswith(b"\n"):
                seen += await proc.stderr.receive_some(4096)
            url = re.search(rb"WebSocket: (\S+)", seen).group(1).decode()
            from netra.auth import mint_token

            async with connect(url, mint_token(TEST_SECRET, "u")) as conn:
                run = conn.run(HANG)
                await until(run, "tool_executing")
                stopping = trio.current_time()
                proc.send_signal(signal.SIGTERM)
                rest = [e async for e in run]
                assert rest[-1].type == "agent_cancelled" and rest[-1].raw["reason"] == "shutdown"
                assert (await conn.wait_closed()).code == 1001
            assert await proc.wait() == 0
            # grace + close flush + hypercorn's own wait for the lingering ping task
            assert trio.current_time() - stopping < 0.3 + 2 * 3 + 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sessions_without_runs_close_at_once_not_after_the_grace():
    """Only running runs get the grace: idle connections are closed 1001 as
    soon as the drain starts."""
    async with open_server(config_for_tests(drain_grace_s=10.0, close_timeout_s=1.0)) as server:
        with trio.fail_after(15):
            async with connect(server.ws_url, token_for(server, "idle")) as idle:
                began = trio.current_time()
                server.request_stop()
                assert (await idle.wait_closed()).code == 1001
                assert trio.current_time() - began < 2.0
            await server._stopped.wait()
