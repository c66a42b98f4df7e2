"""Isolation on the AG-UI path, on real sockets: one request owns one run,
two users' streams never mix, and a client that goes away or stops reading
takes its run with it, promptly, leaving nothing held."""

from __future__ import annotations

import json
import socket

import httpx
import trio

from netra.testing import config_for_tests, open_server, token_for

from .conftest import by_label, settle
from .test_agui import Answer, agui_run, assert_agui_run, parse_sse, run_input


async def test_two_users_concurrent_streams_never_mix():
    async with open_server(config_for_tests(scripted_delay_ms=3)) as server:
        answers: dict[str, list[tuple[dict, Answer]]] = {"alice": [], "bob": []}

        async def one(user: str, n: int) -> None:
            body = run_input(f"{user}-secret-{n} [[stream:25]]")
            if n == 1:  # and one with a tool call, so tool events interleave too
                body = run_input(f'{user}-secret-{n} [[tool:calculator {{"expression": "{n}+1"}}]] [[stream:25]]')
            answers[user].append((body, await agui_run(server, token_for(server, user), body, timeout=30)))

        async with trio.open_nursery() as nursery:
            for n in range(4):
                for user in answers:
                    nursery.start_soon(one, user, n)
        for user, runs in answers.items():
            other = "bob" if user == "alice" else "alice"
            with trio.fail_after(10):
                async with httpx.AsyncClient(base_url=server.http_url) as http:
                    threads = (await http.get(
                        "/api/threads", headers={"Authorization": f"Bearer {token_for(server, user)}"},
                    )).json()["threads"]
            assert {t["id"] for t in threads} == {body["threadId"] for body, _ in runs}
            for body, answer in runs:
                assert_agui_run(answer)
                assert {e["threadId"] for e in answer.events if "threadId" in e} == {body["threadId"]}
                assert {e["runId"] for e in answer.events if "runId" in e} == {body["runId"]}
                assert f"{user}-secret" in answer.text() and other not in answer.raw
        assert server.hub.metrics.isolation_violations._value.get() == 0
        await settle(server.hub)


async def test_a_client_that_aborts_frees_everything_at_once():
    """The client goes away mid-run (AG-UI's abortRun closes the request):
    its run and its tool are cancelled, recorded as cancelled, and every
    slot it held is back, with no trace of it in the server."""
    async with open_server(config_for_tests()) as server:
        hub = server.hub
        token = token_for(server, "alice")
        body = run_input("[[tool:hang {}]]")
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                async with http.stream("POST", "/agui", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                    seen = ""
                    async for text in r.aiter_text():
                        seen += text
                        if "TOOL_CALL_END" in seen:
                            break
                    assert hub.snapshot()["runs_borrowed"] == 1  # running, in its tool
                    aborted_at = trio.current_time()
            # the response is closed: the server sees the client gone
            await settle(hub, timeout=2)
            freed_in = trio.current_time() - aborted_at
        assert freed_in < 1.0
        netra_run = parse_sse(seen)[0]["metadata"]["netra"]["run_id"]
        _, _, runs = await hub.store.get_thread("alice", body["threadId"])
        assert [(r.id, r.status, r.cancel_reason) for r in runs] == [(netra_run, "cancelled", "disconnect")]
        assert [(t.name, t.error) for t in runs[0].tool_calls] == [("hang", "cancelled")]
        assert by_label(hub.metrics.runs_failed) == {"disconnect": 1.0}
        assert by_label(hub.metrics.runs_affected) == {}
        assert hub.run_limiter.borrowed_tokens == 0 and hub.model_limiter.borrowed_tokens == 0
        assert "alice" not in hub.users
        # and the user can go on at once
        assert_agui_run(await agui_run(server, token, run_input("still here?")))


async def test_a_client_that_stops_reading_is_cut_off_within_write_timeout():
    write_timeout = 1.0
    config = config_for_tests(write_timeout_s=write_timeout, max_tool_result_bytes=1_000_000)
    async with open_server(config) as server:
        hub = server.hub
        big = " ".join(['[[tool:big {"bytes": 900000}]]'] * 8)
        body = json.dumps(run_input(f"{big} [[tool:hang {{}}]]")).encode()
        host, port = server.listener.address
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with trio.fail_after(10):
            await sock.connect((host, port))
            await sock.send(
                b"POST /agui HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token_for(server, 'slow')}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            while not hub.users.get("slow") or not hub.users["slow"].runs:
                await trio.sleep(0.005)
            began = trio.current_time()
            await settle(hub, timeout=write_timeout + 5)  # never reading a byte
            took = trio.current_time() - began
        assert write_timeout <= took < write_timeout + 3, took
        assert hub.metrics.http_write_aborts._value.get() >= 1
        assert by_label(hub.metrics.runs_failed) == {"slow_consumer": 1.0}
        assert by_label(hub.metrics.runs_affected) == {}
        [thread] = await hub.store.list_threads("slow")
        _, _, runs = await hub.store.get_thread("slow", thread.id)
        assert [(r.status, r.cancel_reason) for r in runs] == [("cancelled", "disconnect")]
        with trio.fail_after(5):  # the server cut the connection
            try:
                while await sock.recv(1 << 20):
                    pass
            except OSError:
                pass
        sock.close()
        with trio.fail_after(5):
            while server.listener.open_connections:
                await trio.sleep(0.01)


async def test_a_users_run_limit_holds_across_their_agui_requests():
    """Runs through AG-UI take the same per-user slots as /ws runs: past
    max_runs_per_user, a run waits its turn (netra.run_queued) in that
    user's own queue, and another user is not held up."""
    async with open_server(config_for_tests(max_runs_per_user=1)) as server:
        token = token_for(server, "alice")
        answers: list[Answer] = []

        async def run(text: str) -> None:
            answers.append(await agui_run(server, token, run_input(text), timeout=20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, '[[tool:sleep {"ms": 500}]]')
            with trio.fail_after(5):
                while not server.hub.users.get("alice") or not server.hub.users["alice"].runs:
                    await trio.sleep(0.01)
            nursery.start_soon(run, "second")
            other = await agui_run(server, token_for(server, "bob"), run_input("bob is not held up"), timeout=5)
            assert_agui_run(other)
            assert other.of("CUSTOM")[0]["name"] == "netra.agent_started"  # bob never queued
        queued = [a for a in answers if any(e["type"] == "CUSTOM" and e["name"] == "netra.run_queued" for e in a.events)]
        assert len(queued) == 1 and queued[0].of("CUSTOM")[0]["value"] == {"position": 1}
        for answer in answers:
            assert_agui_run(answer)
        await settle(server.hub)
