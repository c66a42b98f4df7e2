"""kill -9 with runs in flight, then start again on the same store.

The real ``netra serve`` in a subprocess, on an SQLite file and on
PostgreSQL: 20 users each send a message with an id whose run hangs in a
tool; the server is killed with SIGKILL while all 20 are in flight and
started again on the same database. The 20 runs must then be recorded
failed with ``node_lost`` (not ``running`` forever), and each message, sent
again unchanged with the same id, must get an answer: half of the clients
resend it as they first did (no thread_id: it starts a new thread), half on
the thread they saw it start (it continues there). A retry of an answered
message is still a duplicate.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

import netra
from netra.auth import mint_token
from netra.client import ConnectionClosed, RunRefused, connect
from netra.testing import TEST_SECRET

from ._backends import Backend

HANG = "[[tool:hang {}]]"
USERS = 20
ROOT = Path(netra.__file__).resolve().parent.parent


@attrs.frozen
class Served:
    ws_url: str
    http_url: str


@asynccontextmanager
async def netra_serve(backend: Backend, workdir: Path, *, tool_timeout_s: float) -> AsyncIterator[tuple[trio.Process, Served]]:
    """``netra serve`` on ``backend``'s database until it says where it
    listens; killed (if still alive) on the way out."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NETRA_JWT_SECRET": TEST_SECRET,
        "NETRA_DATABASE_URL": backend.url,
        "NETRA_CHAOS_TOOLS": "1",
        "NETRA_TOOL_TIMEOUT_S": str(tool_timeout_s),
        "NETRA_HEARTBEAT_INTERVAL_S": "0",
        "NETRA_LOG_LEVEL": "WARNING",
    }
    log = workdir / f"serve-{len(list(workdir.glob('serve-*.log')))}.log"
    with await trio.to_thread.run_sync(functools.partial(open, log, "wb")) as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "netra", "serve", "--port", "0"],
            env=env, stdin=subprocess.DEVNULL, stderr=out, cwd=workdir,
        )
    try:
        with trio.fail_after(30):
            while (found := re.search(r"WebSocket: (ws://\S+)\n", log.read_text())) is None:
                assert proc.poll() is None, f"netra serve exited:\n{log.read_text()}"
                await trio.sleep(0.05)
        ws_url = found.group(1)
        yield proc, Served(ws_url, ws_url.replace("ws://", "http://").removesuffix("/ws"))
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()


def token(user: str) -> str:
    return mint_token(TEST_SECRET, user)


async def test_runs_in_flight_at_a_kill_are_closed_and_their_messages_answered(backend: Backend, tmp_path: Path) -> None:
    users = [f"user{i:02d}" for i in range(USERS)]
    threads: dict[str, str] = {}
    first_runs: dict[str, str] = {}

    # 1. 20 runs in flight, then SIGKILL
    async with netra_serve(backend, tmp_path, tool_timeout_s=600) as (proc, served):
        in_flight = trio.Semaphore(0)

        async def send(user: str) -> None:
            async with connect(served.ws_url, token(user)) as conn:
                async for event in conn.run(HANG, id=f"msg-{user}"):
                    if event.type == "tool_executing":
                        threads[user], first_runs[user] = event.raw["thread_id"], event.raw["run_id"]
                        in_flight.release()
                    assert event.type not in ("agent_completed", "agent_error", "agent_cancelled")
                await conn.wait_closed()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for user in users:
                    nursery.start_soon(_closed_is_fine, send, user)
                for _ in users:
                    await in_flight.acquire()
                proc.send_signal(signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL
    assert len(threads) == USERS

    # 2. the same store, a new process: the runs are closed, the messages answered
    async with (
        netra_serve(backend, tmp_path, tool_timeout_s=1) as (_, served),
        httpx.AsyncClient(base_url=served.http_url, timeout=10) as http,
    ):
        with trio.fail_after(30):
            for user in users:
                body = (await http.get(f"/api/threads/{threads[user]}", headers=_auth(user))).json()
                [run] = body["runs"]
                assert run["id"] == first_runs[user]
                assert (run["status"], run["error_code"]) == ("failed", "node_lost"), run
                assert run["ended_at"] is not None
                assert [m["text"] for m in body["messages"]] == [HANG]  # its message is kept

        answers: dict[str, list] = {}

        async def retry(i: int, user: str) -> None:
            on_thread = {"thread_id": threads[user]} if i % 2 else {}
            async with connect(served.ws_url, token(user)) as conn:
                answers[user] = await conn.collect(HANG, id=f"msg-{user}", **on_thread)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i, user in enumerate(users):
                    nursery.start_soon(retry, i, user)

        with trio.fail_after(30):
            for i, user in enumerate(users):
                events = answers[user]
                assert events[-1].type == "agent_completed", [e.raw for e in events]
                run_id, thread_id = events[-1].raw["run_id"], events[-1].raw["thread_id"]
                assert run_id != first_runs[user]
                if i % 2:  # continued on the thread it started
                    assert thread_id == threads[user]
                    body = (await http.get(f"/api/threads/{thread_id}", headers=_auth(user))).json()
                    assert [(r["id"], r["status"]) for r in body["runs"]] == [
                        (first_runs[user], "failed"), (run_id, "completed"),
                    ]  # fmt: skip
                else:  # resent as it was: a new thread; the old one keeps its record
                    assert thread_id != threads[user]
                    listed = (await http.get("/api/threads", headers=_auth(user))).json()["threads"]
                    assert {t["id"] for t in listed} == {threads[user], thread_id}

            # answered now: a further retry is a duplicate pointing at the answer
            async with connect(served.ws_url, token(users[0])) as conn:
                with pytest.raises(RunRefused) as refused:
                    await conn.collect(HANG, id=f"msg-{users[0]}")
                assert refused.value.code == "bad_request"
                assert refused.value.raw["run_id"] == answers[users[0]][-1].raw["run_id"]


async def _closed_is_fine(send, user: str) -> None:
    """The kill ends every connection: that is the point, not a failure."""
    try:
        await send(user)
    except ConnectionClosed:
        pass


def _auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}
