"""Metrics that match what happened, and logs that never carry a token."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from netra import logs
from netra.client import ConnectionClosed, connect
from netra.testing import config_for_tests, open_server, token_for

from .conftest import by_label, settle
from .test_golden_path import CALC
from .test_isolation import HANG, until


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_match_a_scripted_scenario():
    async with open_server(config_for_tests()) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        with trio.fail_after(10):
            before = samples((await http.get("/metrics")).text)
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "m1")) as a, \
                    connect(server.ws_url, token_for(server, "m2")) as b:
                await a.collect(CALC)
                await a.collect("[[tool:fail {}]]")
                await b.collect("[[model:fail]]")
                run = b.run(HANG)
                started = await until(run, "tool_executing")
                await b.cancel(run_id=started.raw["run_id"])
                [e async for e in run]
                await a.ws.send_message("not json")
                await a.ping()
                # a third user leaves mid-run: a failure of that user's own
                async with connect(server.ws_url, token_for(server, "m3")) as c:
                    await until(c.run(HANG), "tool_executing")
            await settle(server.hub)
            got = samples((await http.get("/metrics")).text)
        def value(name, **labels):
            return got.get((name, tuple(sorted(labels.items()))), 0.0)

        assert value("netra_connections_opened_total") == 3
        assert value("netra_connections_closed_total", code="1000") == 3  # the peer's own close code
        assert value("netra_connections_open") == 0
        assert value("netra_runs_finished_total", outcome="completed", reason="") == 2
        assert value("netra_runs_finished_total", outcome="failed", reason="llm_error") == 1
        assert value("netra_runs_finished_total", outcome="cancelled", reason="client") == 1
        assert value("netra_runs_finished_total", outcome="cancelled", reason="disconnect") == 1
        # failure containment: two runs failed (a model, a user gone), each
        # charged to its own user; the client's cancel is no failure; and no
        # run was stopped by anything outside its own user
        assert value("netra_runs_failed_total", cause="llm_error") == 1
        assert value("netra_runs_failed_total", cause="disconnect") == 1
        assert value("netra_runs_failed_total", cause="client") == 0
        assert not [k for k in got if k[0] == "netra_runs_affected_total"]
        assert value("netra_runs_active") == 0 and value("netra_runs_queued") == 0
        assert value("netra_tool_calls_total", tool="calculator", outcome="ok") == 1
        assert value("netra_tool_calls_total", tool="fail", outcome="error") == 1
        assert value("netra_tool_calls_total", tool="hang", outcome="cancelled") == 2
        assert value("netra_bad_frames_total", code="bad_request") == 1
        assert value("netra_run_duration_seconds_count") == 5
        assert value("netra_isolation_violations_total") == 0
        # every task the scenario started is gone (same scraping connection)
        assert got[("netra_trio_tasks", ())] == before[("netra_trio_tasks", ())] > 5
        assert value("netra_limiter_borrowed", limiter="global") == 0
        assert value("netra_outbox_queued") == 0
        assert value("netra_model_tokens_total", kind="completion_tokens") > 0
        # model turns: two for each tool run (the call, then the answer), one
        # for each run stopped in its tool, and the failing model's one,
        # which streamed nothing
        assert value("netra_model_turn_seconds_count", outcome="ok") == 6
        assert value("netra_model_turn_seconds_count", outcome="error") == 1
        assert value("netra_model_first_event_seconds_count") == 6


async def test_closed_connections_let_go_of_their_tasks_at_once():
    """With a heartbeat far longer than the wait, every task (and so socket)
    of a closed connection is gone within seconds: closed by the client,
    closed by the server (4400), or dropped mid-run."""
    config = config_for_tests(heartbeat_interval_s=120.0, heartbeat_timeout_s=30.0, max_bad_frames=0)
    async with open_server(config) as server, httpx.AsyncClient(base_url=server.http_url) as http:

        async def tasks() -> float:
            return samples((await http.get("/metrics")).text)[("netra_trio_tasks", ())]

        with trio.fail_after(20):
            start = await tasks()
            for i in range(10):
                async with connect(server.ws_url, token_for(server, f"t{i}")) as conn:
                    await conn.collect(CALC)
                    if i % 3 == 1:
                        await until(conn.run(HANG), "tool_executing")  # left mid-run
                    elif i % 3 == 2:
                        await conn.ws.send_message("not json")  # closed 4400 by the server
                        with pytest.raises(ConnectionClosed):
                            await conn.collect(CALC)
        with trio.fail_after(5):  # well inside the 120 s ping interval
            while await tasks() != start:
                await trio.sleep(0.05)
        await settle(server.hub)


async def test_runs_affected_sees_a_run_stopped_from_outside_its_user():
    """The containment counter is not vacuous: a run cancelled on behalf of
    someone else, or torn down with nobody asking, is counted."""
    async with open_server(config_for_tests()) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "victim")) as v:
                run = v.run(HANG)
                started = await until(run, "tool_executing")
                [victim_run] = server.hub.users["victim"].runs
                assert victim_run.id == started.raw["run_id"]
                victim_run.cancel("client", by="someone-else")  # what a cross-user cancel would do
                assert (await until(run, "agent_cancelled")).raw["reason"] == "client"
                assert by_label(server.hub.metrics.runs_affected) == {"other_user": 1}

                run = v.run(HANG)
                await until(run, "tool_executing")
                [session] = server.hub.sessions
                session._nursery.cancel_scope.cancel()  # a teardown no one asked for
                with pytest.raises(ConnectionClosed):
                    async for _ in run:
                        pass
            await settle(server.hub)
        assert by_label(server.hub.metrics.runs_affected) == {"other_user": 1, "unrequested": 1}
        assert by_label(server.hub.metrics.runs_failed) == {}


async def test_model_turns_that_time_out_or_are_cancelled_are_counted_so():
    config = config_for_tests(model_idle_timeout_s=0.3)  # a stalled model sends one chunk
    async with open_server(config) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "slow-model")) as conn:
                events = await conn.collect("[[model:stall]]")
                assert events[-1].type == "agent_error" and events[-1].raw["code"] == "llm_error"
                assert server.hub.metrics.model_turn.labels("timeout")._sum.get() >= 0.3
                run = conn.run("[[model:stall]]")
                delta = await until(run, "text_delta")
                await conn.cancel(run_id=delta.raw["run_id"])
                assert (await until(run, "agent_cancelled")).raw["reason"] == "client"
            await settle(server.hub)
        got = samples(server.hub.metrics.render().decode())
        for outcome in ("timeout", "cancelled"):
            assert got[("netra_model_turn_seconds_count", (("outcome", outcome),))] == 1
        assert got[("netra_model_first_event_seconds_count", ())] == 2


async def test_metrics_can_require_a_token():
    async with open_server(config_for_tests(metrics_token="scrape-me")) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            with trio.fail_after(10):
                assert (await http.get("/metrics")).status_code == 401
                wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                ok = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
                assert ok.status_code == 200 and "netra_runs_active" in ok.text


async def test_no_log_line_contains_the_token():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("DEBUG", stream)
    try:
        async with open_server(config_for_tests(jwt_audience="netra")) as server:
            good = token_for(server, "logged", aud="netra")
            bad = token_for(server, "logged", aud="elsewhere")
            with trio.fail_after(10):
                async with connect(server.ws_url, good) as conn:
                    await conn.collect("[[tool:fail {}]]")
                    await conn.collect("[[model:fail]]")
                    await conn.refresh(bad)
                    await conn.ping()
                try:
                    async with connect(server.ws_url, bad):
                        pass
                except Exception:
                    pass
                try:
                    async with connect(server.ws_url, bad, auth="frame"):
                        pass
                except Exception:
                    pass
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line["msg"] == "connection opened" and line["user_id"] == "logged" for line in lines)
    assert any(line["msg"].startswith("upgrade refused") for line in lines)
    assert any(line.get("run_id") and line.get("code") == "llm_error" for line in lines)
    for token in (good, bad):
        assert token not in text
        assert token.split(".")[2] not in text  # not even the signature
