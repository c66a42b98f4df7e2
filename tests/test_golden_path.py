"""The golden path, end to end, through a real hypercorn server and real
WebSocket clients: log in, connect, run an agent, stream its events."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

from netra.client import RunRefused, connect
from netra.testing import open_server, config_for_tests, token_for
from netra.tools import tool

from .conftest import netra_tasks, settle

FIVE = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]
CALC = 'what is [[tool:calculator {"expression": "6*7"}]]'


def assert_run_shape(events, *, tools: int = 1) -> None:
    """The protocol's rules for one successful run."""
    types = [e.type for e in events]
    assert types[0] == "agent_started"
    assert types[-1] == "agent_completed"
    assert sum(t in ("agent_completed", "agent_error", "agent_cancelled") for t in types) == 1
    firsts = [types.index(t) for t in FIVE]
    assert firsts == sorted(firsts), types
    assert types.count("tool_executing") == types.count("tool_completed") == tools
    for e in events:
        if e.type == "tool_executing":
            done = [x for x in events if x.type == "tool_completed" and x.raw["tool_call_id"] == e.raw["tool_call_id"]]
            assert len(done) == 1 and events.index(done[0]) > events.index(e)
    deltas = "".join(e.raw["delta"] for e in events if e.type == "text_delta")
    assert deltas and deltas == events[-1].raw["text"]
    run_ids = {e.raw["run_id"] for e in events}
    assert len(run_ids) == 1


async def test_golden_path(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "alice"), record=True) as conn:
            assert conn.connected["user_id"] == "alice"
            assert conn.connected["seq"] == 1
            assert conn.connected["limits"]["max_runs_per_user"] == server.hub.config.max_runs_per_user
            events = await conn.collect(CALC)
            assert_run_shape(events)
            done = [e for e in events if e.type == "tool_completed"][0]
            assert done.raw["result"] == 42
            assert "42" in events[-1].raw["text"]
            seqs = [r.seq for r in conn.received]
            assert seqs == list(range(1, len(seqs) + 1))
            assert all(isinstance(r.ts, int) and r.ts > 1_600_000_000_000 for r in conn.received)


async def test_subprotocol_selected_and_first_frame_auth(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "bob"), auth="frame") as conn:
            assert conn.ws.subprotocol == "netra.v1"
            assert conn.user_id == "bob"
            assert_run_shape(await conn.collect(CALC))


async def test_seed_scenarios_concurrently():
    """1, 3, 5 and 8 users at once (17 in all), each sending messages that call
    tools: every run succeeds with all five events, and runs of different
    users overlap in time instead of running one after another."""
    config = config_for_tests(scripted_delay_ms=20, max_runs=64)
    async with open_server(config) as server:
        intervals: list[tuple[float, float, str]] = []
        results: dict[str, list[list]] = {}

        async def user(name: str, messages: int) -> None:
            async with connect(server.ws_url, token_for(server, name), record=True) as conn:
                for i in range(messages):
                    text = f'{name} #{i}: [[tool:calculator {{"expression": "{i}+1"}}]]'
                    events = await conn.collect(text)
                    intervals.append((events[0].ts, events[-1].ts, name))
                    results.setdefault(name, []).append(events)
                mine = {e.raw["run_id"] for run in results[name] for e in run}
                for r in conn.received[1:]:
                    assert r.raw.get("run_id") in mine

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for scenario, users in enumerate((1, 3, 5, 8)):
                    for u in range(users):
                        nursery.start_soon(user, f"s{scenario}-u{u}", 3)
        assert len(results) == 17
        for runs in results.values():
            assert len(runs) == 3
            for events in runs:
                assert_run_shape(events)
        # overlap: at some instant, runs of several different users were in flight
        best = max(len({n for s, e, n in intervals if s <= t < e}) for t, _, _ in intervals)
        assert best >= 5, f"runs did not overlap (at most {best} users at once)"
        await settle(server.hub)


async def test_users_never_see_each_others_events(server):
    with trio.fail_after(20):
        seen: dict[str, list] = {}

        async def user(name: str) -> None:
            async with connect(server.ws_url, token_for(server, name), record=True) as conn:
                runs = set()
                threads = set()
                for i in range(4):
                    events = await conn.collect(f"{name} {i} [[tool:sleep {{\"ms\": 5}}]]")
                    runs.add(events[0].raw["run_id"])
                    threads.add(events[0].raw["thread_id"])
                seen[name] = [(r.raw.get("run_id"), r.raw.get("thread_id")) for r in conn.received[1:]]
                assert all(run in runs and thread in threads for run, thread in seen[name])
                assert all(r.raw.get("user_id", name) == name for r in conn.received)

        async with trio.open_nursery() as nursery:
            for u in range(6):
                nursery.start_soon(user, f"user{u}")
        all_runs = [{r for r, _ in events} for events in seen.values()]
        assert sum(len(s) for s in all_runs) == len(set().union(*all_runs)) == 24
    assert server.hub.metrics.isolation_violations._value.get() == 0


async def test_failing_tool_is_a_failed_call_and_the_run_completes(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "carol"), record=True) as conn, \
                connect(server.ws_url, token_for(server, "dave"), record=True) as other:
            events = await conn.collect("please [[tool:fail {}]]")
            failed = [e for e in events if e.type == "tool_completed"][0]
            assert "chaos: fail" in failed.raw["error"] and "result" not in failed.raw
            assert events[-1].type == "agent_completed"
            assert "fail failed" in events[-1].raw["text"]
            assert_run_shape(await conn.collect(CALC))  # same connection, next message
            assert [r.type for r in other.received] == ["connected"]


async def test_failing_model_ends_the_run_with_llm_error(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "erin"), record=True) as conn:
            events = await conn.collect("[[model:fail_midstream]] tell me a story")
            assert events[-1].type == "agent_error"
            assert events[-1].raw["code"] == "llm_error"
            assert events[-1].raw["retryable"] is True
            assert [e.type for e in events][:2] == ["agent_started", "agent_thinking"]
            assert_run_shape(await conn.collect(CALC))


async def test_a_run_that_fails_before_any_output_still_thinks_once(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "ivy")) as conn:
            events = await conn.collect("[[model:fail]]")
            assert [e.type for e in events] == ["agent_started", "agent_thinking", "agent_error"]


async def test_disconnect_mid_run_cancels_the_run_and_its_tool():
    entered, cancelled = trio.Event(), trio.Event()

    @tool
    async def watch() -> str:
        """Waits forever, noting when it is cancelled."""
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with open_server(config_for_tests(), extra_tools=[watch]) as server:
        with trio.fail_after(10):
            async with connect(server.ws_url, token_for(server, "frank")) as conn:
                await conn.send({"type": "user_message", "text": "[[tool:watch {}]]"})
                await entered.wait()
                assert server.hub.snapshot()["runs_borrowed"] == 1
                assert any(n == "netra.runs.execute" for n in netra_tasks())
            await cancelled.wait()
            await settle(server.hub)
            finished = server.hub.metrics.runs_finished.labels("cancelled", "disconnect")._value.get()
            assert finished == 1


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda s: "not-a-jwt", id="garbage"),
        pytest.param(lambda s: _sign({"sub": "x", "exp": _in(60)}, "wrong-secret-" * 4), id="wrong-signature"),
        pytest.param(lambda s: _unsigned({"sub": "x", "exp": _in(60)}), id="alg-none"),
        pytest.param(lambda s: token_for(s, "x", ttl_s=-120), id="expired"),
        pytest.param(lambda s: _sign({"exp": _in(60)}, s.hub.config.jwt_secret), id="no-sub"),
        pytest.param(lambda s: _sign({"sub": "x"}, s.hub.config.jwt_secret), id="no-exp"),
    ],
)
async def test_bad_tokens_are_refused(make_token):
    async with open_server(config_for_tests(jwt_audience="netra")) as server:
        with trio.fail_after(10):
            token = make_token(server)
            # in the header: HTTP 401 before the upgrade
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(
                    server.ws_url, extra_headers=[("Authorization", f"Bearer {token}")]
                ):
                    pass
            assert rejected.value.status_code == 401
            assert json.loads(rejected.value.body)["code"] == "unauthorized"
            # in the first frame: close 4401
            await _expect_close(server, [{"type": "auth", "token": token}], 4401)
            assert server.hub.metrics.runs_active._value.get() == 0
            assert server.hub.snapshot()["runs_borrowed"] == 0


async def test_wrong_audience_is_refused():
    async with open_server(config_for_tests(jwt_audience="netra")) as server:
        with trio.fail_after(10):
            token = token_for(server, "x", aud="someone-else")
            await _expect_close(server, [{"type": "auth", "token": token}], 4401)
            ok = token_for(server, "x", aud="netra")
            async with connect(server.ws_url, ok) as conn:
                assert conn.user_id == "x"


async def test_missing_token_is_refused():
    async with open_server(config_for_tests(auth_timeout_s=0.3)) as server:
        with trio.fail_after(10):
            # a first frame that is not auth
            await _expect_close(server, [{"type": "user_message", "text": "hi"}], 4401)
            # nothing at all within auth_timeout
            await _expect_close(server, [], 4408)
            # a token in the query string is never accepted
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(server.ws_url + "?token=" + token_for(server, "x")):
                    pass
            assert rejected.value.status_code == 400


async def test_foreign_origin_is_refused_before_upgrade(server):
    with trio.fail_after(10):
        headers = [("Authorization", f"Bearer {token_for(server, 'x')}"), ("Origin", "https://evil.example")]
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(server.ws_url, extra_headers=headers):
                pass
        assert rejected.value.status_code == 403
        same = [("Authorization", f"Bearer {token_for(server, 'x')}"), ("Origin", server.http_url)]
        async with connect(server.ws_url, token_for(server, "x"), extra_headers=same[1:]) as conn:
            assert conn.user_id == "x"


async def test_ping_pong_and_health(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "gina"), record=True) as conn:
            await conn.ping()
            pong = conn.received[-1]
            assert pong.type == "pong" and pong.raw["id"]


async def test_refused_message_gets_an_error_with_its_ref(server):
    with trio.fail_after(10):
        async with connect(server.ws_url, token_for(server, "hank")) as conn:
            with pytest.raises(RunRefused) as refused:
                await conn.collect("hello", agent="no-such-agent")
            assert refused.value.code == "not_found"
            assert refused.value.raw["ref"]


# -- helpers -------------------------------------------------------------------


def _in(seconds: float) -> int:
    import time

    return int(time.time() + seconds)


def _sign(claims: dict, secret: str) -> str:
    import jwt

    return jwt.encode(claims, secret, algorithm="HS256")


def _unsigned(claims: dict) -> str:
    import base64

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


async def _expect_close(server, frames: list[dict], code: int) -> None:
    async with trio_websocket.open_websocket_url(server.ws_url) as ws:
        for frame in frames:
            await ws.send_message(json.dumps(frame))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason.code == code
