"""Sessions that survive a dropped connection: the runs go on, the events are
kept, and a new connection of the same user takes the session over with no
event lost or repeated (by seq). In memory, under the autojump clock."""

from __future__ import annotations

import json

import trio

from netra.testing import ConnectionEnded, config_for_tests, open_hub
from tests.conftest import settle

TERMINAL = ("agent_completed", "agent_error", "agent_cancelled")


def resumable(**overrides):
    return config_for_tests(**{"resume_window_s": 30.0, "scripted_delay_ms": 50, **overrides})


def resume_frame(connected: dict, last_seq: int, **changes) -> dict:
    return {"type": "resume", "session_id": connected["session_id"],
            "resume_token": connected["resume_token"], "last_seq": last_seq, **changes}


async def until_terminal(conn) -> list[dict]:
    events = []
    while not events or events[-1]["type"] not in TERMINAL:
        events.append(await conn.receive())
    return events


async def test_a_dropped_connection_resumes_with_nothing_lost_or_repeated(autojump_clock):
    async with open_hub(resumable()) as server:
        async with server.connect(user_id="ann") as first:
            connected = first.received[0]
            assert connected["session_id"] and connected["resume_token"]
            await first.send({"type": "user_message", "text": "[[stream:40]] tell me a story", "id": "s1"})
            seen = []
            while sum(e["type"] == "text_delta" for e in seen) < 5:
                seen.append(await first.receive())
            first.client.drop()  # the network goes away: no close frame
        await trio.sleep(3)  # the run goes on meanwhile
        async with server.connect(user_id="ann") as second:
            await second.send(resume_frame(connected, last_seq=seen[-1]["seq"]))
            resumed = await second.until("resumed")
            assert resumed["seq"] == seen[-1]["seq"] and resumed["session_id"] == connected["session_id"]
            assert resumed["replayed"] > 0
            rest = await until_terminal(second)
        events = seen + rest
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
        assert events[-1]["type"] == "agent_completed"
        assert "".join(e["delta"] for e in events if e["type"] == "text_delta") == events[-1]["text"]
        m = server.hub.metrics
        assert m.sessions_resumed.labels("resumed")._value.get() == 1
        assert m.runs_finished.labels("completed", "")._value.get() == 1
        await settle(server.hub)


async def test_live_events_follow_the_replay_on_the_same_numbering(autojump_clock):
    async with open_hub(resumable()) as server:
        async with server.connect(user_id="bo") as first:
            connected = first.received[0]
            first.client.drop()
        async with server.connect(user_id="bo") as second:
            await second.send(resume_frame(connected, last_seq=1))
            resumed = await second.until("resumed")
            assert resumed["replayed"] == 0
            await second.send({"type": "ping", "id": "after"})
            pong = await second.until("pong")
            assert pong["seq"] == 2 and pong["id"] == "after"


async def test_a_resume_by_another_user_or_with_a_wrong_token_changes_nothing(autojump_clock):
    async with open_hub(resumable()) as server:
        async with server.connect(user_id="cy") as first:
            connected = first.received[0]
            await first.send({"type": "user_message", "text": "[[stream:100]] long", "id": "long"})
            await first.until("text_delta")
            first.client.drop()
        async with server.connect(user_id="mallory") as thief:
            await thief.send(resume_frame(connected, last_seq=0))
            refused = await thief.until("error")
            assert refused["code"] == "not_found"
            await thief.send({"type": "ping", "id": "still-mine"})
            assert (await thief.until("pong"))["id"] == "still-mine"  # its own session goes on
        async with server.connect(user_id="cy") as guess:
            await guess.send(resume_frame(connected, last_seq=0, resume_token="x" * 32))
            assert (await guess.until("error"))["code"] == "not_found"
        async with server.connect(user_id="cy") as owner:  # the owner still can
            await owner.send(resume_frame(connected, last_seq=0))
            await owner.until("resumed")
            assert (await until_terminal(owner))[-1]["type"] == "agent_completed"


async def test_after_the_window_the_runs_are_cancelled_and_the_session_is_gone(autojump_clock):
    async with open_hub(resumable(resume_window_s=5.0)) as server:
        async with server.connect(user_id="di") as first:
            connected = first.received[0]
            await first.send({"type": "user_message", "text": "[[stream:1000]] very long", "id": "x"})
            await first.until("text_delta")
            first.client.drop()
        await trio.sleep(6)
        m = server.hub.metrics
        assert m.runs_finished.labels("cancelled", "disconnect")._value.get() == 1
        assert m.sessions_detached._value.get() == 1
        async with server.connect(user_id="di") as late:
            await late.send(resume_frame(connected, last_seq=3))
            assert (await late.until("error"))["code"] == "not_found"
        await settle(server.hub)


async def test_a_close_frame_ends_the_session_at_once(autojump_clock):
    async with open_hub(resumable()) as server:
        async with server.connect(user_id="ed") as first:
            connected = first.received[0]
            await first.send({"type": "user_message", "text": "[[stream:1000]] long", "id": "x"})
            await first.until("text_delta")
            await first.client.close(1000)
        with trio.fail_after(3):  # far less than the window
            while server.hub.sessions:
                await trio.sleep(0.05)
        assert server.hub.metrics.runs_finished.labels("cancelled", "disconnect")._value.get() == 1
        async with server.connect(user_id="ed") as again:
            await again.send(resume_frame(connected, last_seq=2))
            assert (await again.until("error"))["code"] == "not_found"


async def test_events_past_the_buffer_ask_for_a_resync(autojump_clock):
    async with open_hub(resumable(resume_buffer_bytes=4096, scripted_delay_ms=5)) as server:
        async with server.connect(user_id="flo") as first:
            connected = first.received[0]
            await first.send({"type": "user_message", "text": "[[stream:400]] long", "id": "x"})
            await first.until("text_delta")
            first.client.drop()
        await trio.sleep(5)  # about 400 deltas while away: far more than 4 KiB
        async with server.connect(user_id="flo") as second:
            await second.send(resume_frame(connected, last_seq=3))
            resync = await second.until("resync_required")
            assert resync["last_seq"] == 3 and resync["seq"] > 3
            assert server.hub.metrics.sessions_resumed.labels("resync_required")._value.get() == 1
            await second.send({"type": "ping", "id": "p"})
            assert (await second.until("pong"))["seq"] == resync["seq"] + 1


async def test_a_session_still_attached_is_taken_over(autojump_clock):
    """A half-open connection looks alive to the server; the client that
    gave up on it resumes elsewhere and gets the session."""
    async with open_hub(resumable()) as server:
        async with server.connect(user_id="gus") as stale:
            connected = stale.received[0]
            await stale.send({"type": "user_message", "text": "[[stream:60]] story", "id": "x"})
            await stale.until("text_delta")
            async with server.connect(user_id="gus") as fresh:
                await fresh.send(resume_frame(connected, last_seq=stale.received[-1]["seq"]))
                await fresh.until("resumed")
                assert (await until_terminal(fresh))[-1]["type"] == "agent_completed"
            try:
                await stale.wait_closed()
            except ConnectionEnded:
                pass
            assert stale.closed is not None


async def test_without_a_window_a_drop_cancels_at_once_and_nothing_is_offered(autojump_clock):
    async with open_hub(config_for_tests(scripted_delay_ms=50)) as server:
        async with server.connect(user_id="hal") as conn:
            assert conn.received[0].get("resume_token") is None
            await conn.send({"type": "user_message", "text": "[[stream:100]] long", "id": "x"})
            await conn.until("text_delta")
            conn.client.drop()
        with trio.fail_after(2):
            while server.hub.sessions:
                await trio.sleep(0.05)
        assert server.hub.metrics.runs_finished.labels("cancelled", "disconnect")._value.get() == 1


async def test_resume_over_real_sockets_after_a_reset():
    """A TCP reset mid-stream (a phone changing networks), then a new
    connection: the run it was watching completes on the new one."""
    from netra.testing import open_server, token_for
    from tests.rawws import open_raw

    async with open_server(resumable(scripted_delay_ms=20)) as server:
        with trio.fail_after(20):
            token = token_for(server, "ivy")
            raw = await open_raw(server.ws_url, token)
            connected = await raw.read_event()
            await raw.send_json({"type": "user_message", "text": "[[stream:30]] story", "id": "s"})
            seen = []
            while sum(e["type"] == "text_delta" for e in seen) < 3:
                seen.append(await raw.read_event())
            raw.reset()
            again = await open_raw(server.ws_url, token)
            assert (await again.read_event())["type"] == "connected"
            await again.send_json(resume_frame(connected, last_seq=seen[-1]["seq"]))
            resumed = await again.read_event()
            assert resumed["type"] == "resumed" and resumed["seq"] == seen[-1]["seq"]
            rest = []
            while not rest or rest[-1]["type"] not in TERMINAL:
                rest.append(await again.read_event())
            seqs = [e["seq"] for e in seen + rest]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert rest[-1]["type"] == "agent_completed"
            await again.stream.aclose()


async def test_events_pending_at_the_resume_come_after_resumed_and_once(autojump_clock):
    """An event queued but not yet flushed when a resume attaches (the
    flusher runs later in the same pass) goes out in the replay, after
    ``resumed``, exactly once (found by bench.resume: it went out first,
    then again in the replay)."""
    from netra.protocol import Pong
    from netra.transport import memory_transport_pair

    async with open_hub(resumable()) as server:
        async with server.connect(user_id="jo") as first:
            connected = first.received[0]
            first.client.drop()
        [session] = server.hub.sessions
        with trio.fail_after(5):
            while not session.detached:
                await trio.sleep(0.01)
        session.send(Pong(id="pending"))  # queued; the flusher has not run yet
        transport, client = memory_transport_pair()
        session._attach(transport, last_seq=connected["seq"], released=trio.Event())
        frames = [await client.receive() for _ in range(2)]
        first_frame, second_frame = (json.loads(f) for f in frames)
        assert first_frame["type"] == "resumed" and first_frame["replayed"] == 1
        assert second_frame["type"] == "pong" and second_frame["seq"] == connected["seq"] + 1
        await trio.sleep(0.1)
        assert client.queued_bytes == 0  # and nothing more: not sent twice


async def test_many_resumes_mid_stream_replay_in_order(autojump_clock):
    """Resumes that land while the session has events not yet flushed: the
    replay comes first, in order, then live events, never one of them
    twice (found by bench.resume: live events went out before resumed)."""
    async with open_hub(resumable(scripted_delay_ms=2)) as server:

        async def one(i: int) -> None:
            async with server.connect(user_id=f"u{i}") as first:
                connected = first.received[0]
                await first.send({"type": "user_message", "text": "[[stream:60]] go", "id": "x"})
                seen = []
                while sum(e["type"] == "text_delta" for e in seen) < 5:
                    seen.append(await first.receive())
                first.client.drop()
            async with server.connect(user_id=f"u{i}") as second:
                await second.send(resume_frame(connected, last_seq=seen[-1]["seq"]))
                resumed = await second.until("resumed")
                assert resumed["seq"] == seen[-1]["seq"]
                rest = await until_terminal(second)
            seqs = [e["seq"] for e in seen + rest]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (i, seqs)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(one, i)
        assert server.hub.metrics.sessions_resumed.labels("resumed")._value.get() == 60


async def test_a_user_at_the_connection_limit_can_still_come_back_to_resume(autojump_clock):
    async with open_hub(resumable(max_connections_per_user=1)) as server:
        async with server.connect(user_id="kai") as first:
            connected = first.received[0]
            first.client.drop()
        async with server.connect(user_id="kai") as second:
            assert second.closed is None  # not refused 4429 for the session it comes back for
            await second.send(resume_frame(connected, last_seq=1))
            await second.until("resumed")
