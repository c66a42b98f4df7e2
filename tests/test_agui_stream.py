"""An AG-UI stream without a socket: the body quart iterates, driven by
hand over an in-memory hub under the autojump clock, so the timed rules
(keep-alive comments, a client behind, a slow consumer, a client gone, a
run paused at an approval that nobody answers) are checked
deterministically."""

from __future__ import annotations

import json
import time
from typing import Any

import trio

import pytest

from netra.agui._input import parse_run_input
from netra.agui._stream import KEEP_ALIVE, AguiStream
from netra.auth import Identity
from netra.errors import NotFound
from netra.protocol import ToolDecision
from netra.testing import config_for_tests, open_hub

from .conftest import by_label, settle
from .test_agui import Answer, assert_agui_run, parse_sse, run_input
from .test_approvals import TOOLS, TRANSFER


def stream_for(hub: Any, text: str, *, user: str = "alice", **fields: Any) -> AguiStream:
    request = parse_run_input(json.dumps(run_input(text, **fields)), max_text_chars=32000)
    return AguiStream(
        hub=hub, identity=Identity(user_id=user, expires_at=time.time() + 3600), request=request, new_thread=True,
    )


async def read_all(stream: AguiStream, *, pause_s: float = 0.0) -> list[bytes]:
    """Iterate the body as quart does, pausing before each chunk (a slow client)."""
    chunks = []
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
            await trio.sleep(pause_s)
    return chunks


def answer_of(chunks: list[bytes]) -> Answer:
    raw = b"".join(chunks).decode()
    return Answer(200, None, parse_sse(raw), raw=raw)  # type: ignore[arg-type]


async def test_a_quiet_run_sends_keep_alive_comments_at_the_heartbeat_interval(autojump_clock):
    async with open_hub(config_for_tests(heartbeat_interval_s=20.0, tool_timeout_s=600)) as server:
        with trio.fail_after(300):
            chunks = await read_all(stream_for(server.hub, '[[tool:sleep {"ms": 65000}]]'))
        assert chunks.count(KEEP_ALIVE) == 3  # at 20, 40 and 60 s of a 65 s silence
        assert_agui_run(answer_of(chunks))
        await settle(server.hub)


async def test_text_merges_while_the_client_is_behind(autojump_clock):
    async with open_hub(config_for_tests(scripted_delay_ms=10)) as server:
        stream = stream_for(server.hub, "hello [[stream:40]]")
        with trio.fail_after(60):
            chunks = await read_all(stream, pause_s=0.2)  # a client 20 times slower than the model
        answer = answer_of(chunks)
        assert_agui_run(answer)
        contents = answer.of("TEXT_MESSAGE_CONTENT")
        assert 1 < len(contents) < 10  # 40 deltas, written as a few
        assert answer.text().startswith("You said: “hello”")
        await settle(server.hub)


async def test_a_client_that_takes_nothing_is_a_slow_consumer_and_its_run_is_cancelled(autojump_clock):
    config = config_for_tests(outbox_size=6, scripted_delay_ms=1)
    async with open_hub(config) as server:
        hub = server.hub
        calls = " ".join('[[tool:calculator {"expression": "1+%d"}]]' % i for i in range(8))
        stream = stream_for(hub, calls)
        with trio.fail_after(60):
            async with stream:
                first = await stream.__anext__()  # RUN_STARTED; then the client stops taking
                with trio.fail_after(5):
                    while stream.run is not None and stream.run.id in stream.runs.runs:
                        await trio.sleep(0.01)
                rest = [chunk async for chunk in stream]
        answer = answer_of([first, *rest])
        assert answer.types() == ["RUN_STARTED", "RUN_FINISHED"]  # queued events dropped, the ending kept
        assert answer.terminal["outcome"] == {"type": "cancelled"}
        assert hub.metrics.outbox_full._value.get() == 1
        assert by_label(hub.metrics.runs_failed) == {"slow_consumer": 1.0}
        assert by_label(hub.metrics.runs_affected) == {}
        await settle(hub)


async def test_a_body_left_early_cancels_its_run_as_its_users_disconnect(autojump_clock):
    async with open_hub() as server:
        hub = server.hub
        stream = stream_for(hub, "[[tool:hang {}]]", thread_id="gone-thread")
        with trio.fail_after(60):
            with trio.move_on_after(5):  # the client goes away mid-run: quart's task is cancelled
                await read_all(stream)
        assert stream.run is not None
        _, _, runs = await hub.store.get_thread("alice", "gone-thread")
        assert [(r.status, r.cancel_reason) for r in runs] == [("cancelled", "disconnect")]
        assert [(t.name, t.error) for t in runs[0].tool_calls] == [("hang", "cancelled")]
        assert by_label(hub.metrics.runs_affected) == {}  # its own user's ending, not an outside teardown
        assert by_label(hub.metrics.runs_failed) == {"disconnect": 1.0}
        # everything it held is back, at once: no run, slot, connection or user left
        assert hub.snapshot() == {
            "connections": 0, "users": 0, "runs_borrowed": 0, "model_borrowed": 0, "tools_borrowed": 0,
            "queued_runs": 0,
        }
        await settle(hub)


# -- a run paused at an approval: owned by the server, not by a request ---------------------


async def test_a_parked_run_nobody_answers_is_denied_at_its_timeout_and_finishes(autojump_clock):
    async with open_hub(config_for_tests(approval_timeout_s=300.0), extra_tools=TOOLS) as server:
        hub = server.hub
        stream = stream_for(hub, TRANSFER, thread_id="parked")
        with trio.fail_after(60):
            answer = answer_of(await read_all(stream))
        assert_agui_run(answer)
        assert answer.terminal["outcome"]["type"] == "interrupt"
        began = trio.current_time()
        await trio.sleep(299)  # the request is long over; the run waits all that time
        assert len(hub.approvals) == 1 and len(hub.agui) == 1
        # waiting for a person, it holds its user's run slot, not a global one
        assert hub.snapshot()["runs_borrowed"] == 0 and hub.users["alice"].run_limiter.borrowed_tokens == 1
        await trio.sleep(2)
        await settle(hub)
        _, messages, [run] = await hub.store.get_thread("alice", "parked")
        assert (run.status, run.approvals[0].status, run.approvals[0].reason) == ("completed", "denied", "timeout")
        assert run.duration_ms == pytest.approx((trio.current_time() - began) * 1000, abs=3000)
        assert "transfer failed: not approved" in messages[-1].text
        assert len(hub.agui) == 0 and hub.snapshot()["connections"] == 0


async def test_a_parked_run_that_does_too_much_unwatched_goes_on_but_cannot_be_resumed(autojump_clock):
    """Decided from elsewhere, a parked run goes on with nobody streaming
    it; past outbox_size events its events are dropped rather than held,
    and a resume finds nothing (the thread will have the outcome)."""
    async with open_hub(config_for_tests(outbox_size=8), extra_tools=TOOLS) as server:
        hub = server.hub
        calls = " ".join('[[tool:calculator {"expression": "1+%d"}]]' % i for i in range(6))
        stream = stream_for(hub, f"{TRANSFER} {calls} [[tool:hang {{}}]]", thread_id="busy-parked")
        with trio.fail_after(60):
            answer = answer_of(await read_all(stream))
        [interrupt] = answer.terminal["outcome"]["interrupts"]
        meta = interrupt["metadata"]["netra"]
        hub.approvals.decide("alice", ToolDecision(run_id=meta["run_id"], tool_call_id="call_1", decision="approve"))
        await trio.sleep(5)
        assert hub.snapshot()["runs_borrowed"] == 1 and hub.metrics.outbox_full._value.get() == 1  # going on
        assert len(hub.agui) == 0  # but no longer resumable
        resume = parse_run_input(json.dumps(run_input(None, thread_id="busy-parked", resume=[
            {"interruptId": interrupt["id"], "status": "resolved", "payload": {"approve": True}}])),
            max_text_chars=32000)
        with pytest.raises(NotFound):
            hub.agui.plan("alice", resume)
        [run] = hub.users["alice"].runs
        run.cancel("client", by="alice")
        await settle(hub)
        _, _, [stored] = await hub.store.get_thread("alice", "busy-parked")
        assert stored.status == "cancelled" and len(stored.tool_calls) == 8
        assert by_label(hub.metrics.runs_affected) == {}
