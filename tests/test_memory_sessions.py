"""Whole sessions over the in-memory transport, under the autojump clock:
the protocol's timing rules (rate limits, token expiry, write deadlines)
exactly, in milliseconds of real time, with no socket in the way."""

from __future__ import annotations

import pytest
import trio

from netra.testing import ConnectionEnded, config_for_tests, open_hub, token_for
from tests.conftest import settle

CALC = 'what is [[tool:calculator {"expression": "6*7"}]]'
FIVE = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")


async def test_golden_path_in_memory(autojump_clock):
    async with open_hub() as server:
        async with server.connect(user_id="alice") as conn:
            events = await conn.run(CALC, id="m1")
            kinds = iter(e["type"] for e in events)
            assert all(kind in kinds for kind in FIVE)  # the five, in this order
            deltas = "".join(e["delta"] for e in events if e["type"] == "text_delta")
            assert deltas == events[-1]["text"] and "42" in deltas
            seqs = [e["seq"] for e in conn.received]
            assert seqs == list(range(1, len(seqs) + 1))
        await settle(server.hub)


async def test_auth_frame_and_bad_tokens(autojump_clock):
    async with open_hub() as server:
        async with server.connect(token_for(server, "bob")) as conn:
            assert conn.received[0]["user_id"] == "bob"
        async with server.connect("not-a-token") as refused:
            assert refused.closed is not None and refused.closed.code == 4401


async def test_silence_before_auth_closes_4408_at_the_auth_timeout(autojump_clock):
    async with open_hub(config_for_tests(auth_timeout_s=3.0)) as server:
        from netra.transport import memory_transport_pair
        from netra.web.ws import serve_transport

        transport, client = memory_transport_pair()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_transport, server.hub, transport, None)
            closed = await client.receive()
            assert closed.code == 4408 and trio.current_time() - started == pytest.approx(3.0, abs=0.01)
            await client.close(4408)  # the close handshake, answered


async def test_rate_limit_answers_limit_minus_one_refusals_then_closes_4429(autojump_clock):
    """docs/protocol.md: rate_abuse_limit refusals in a row, the last one
    closes the connection with 4429 instead of answering."""
    config = config_for_tests(rate_per_s=1.0, rate_burst=2, rate_abuse_limit=10)
    async with open_hub(config) as server:
        async with server.connect(user_id="flood") as conn:
            for i in range(12):  # all at the same instant: 2 accepted, then refusals
                await conn.send({"type": "ping", "id": f"p{i}"})
            closed = await conn.wait_closed()
            kinds = [e["type"] for e in conn.received[1:]]
            assert kinds.count("pong") == 2
            assert kinds.count("error") == 9 and {e["code"] for e in conn.received if e["type"] == "error"} == {
                "rate_limited"
            }
            assert closed.code == 4429


async def test_an_accepted_message_ends_the_refusal_streak(autojump_clock):
    config = config_for_tests(rate_per_s=1.0, rate_burst=1, rate_abuse_limit=3)
    async with open_hub(config) as server:
        async with server.connect(user_id="polite") as conn:
            for _ in range(5):  # one accepted, one refused, then a token is back
                await conn.send({"type": "ping"})
                await conn.send({"type": "ping"})
                assert (await conn.receive())["type"] == "pong"
                assert (await conn.receive())["code"] == "rate_limited"
                await trio.sleep(1.0)
            assert conn.closed is None


async def test_token_expiry_closes_4401_after_its_grace_and_a_refresh_moves_it(autojump_clock):
    import time

    config = config_for_tests(token_expiry_grace_s=2.0)
    async with open_hub(config) as server:
        async with server.connect(token_for(server, "eve", ttl_s=10)) as conn:
            await trio.sleep(8)
            await conn.send({"type": "auth", "token": token_for(server, "eve", ttl_s=30)})
            await trio.sleep(10)  # past the first token's expiry and grace: still open
            await conn.send({"type": "ping", "id": "alive"})
            assert (await conn.until("pong"))["id"] == "alive"
            opened = time.time()
            closed = await conn.wait_closed()
            assert closed.code == 4401
            assert 0 <= time.time() - opened < 1  # wall time: the autojump clock did the waiting


async def test_a_client_that_stops_reading_is_closed_4430_at_the_write_deadline(autojump_clock):
    config = config_for_tests(write_timeout_s=2.0, close_timeout_s=1.0, scripted_delay_ms=10, max_output_bytes=10**8)
    async with open_hub(config) as server:
        async with server.connect(user_id="deaf", capacity_bytes=4096) as deaf, \
                server.connect(user_id="fine") as fine:
            await deaf.send({"type": "user_message", "text": "[[stream:5000]] go"})
            began = trio.current_time()
            events = await fine.run(CALC)  # another user is served meanwhile
            assert events[-1]["type"] == "agent_completed"
            with trio.fail_after(10):
                while "deaf" in server.hub.users:
                    await trio.sleep(0.1)
            # behind from the first second, then write_timeout_s + close_timeout_s at most
            assert trio.current_time() - began <= 1 + 2.0 + 1.0
            m = server.hub.metrics
            assert m.slow_consumer_closes._value.get() == 1
            assert m.runs_finished.labels("cancelled", "slow_consumer")._value.get() == 1
            assert m.runs_affected.labels("other_user")._value.get() == 0
        await settle(server.hub)


async def test_deltas_merge_while_the_client_is_behind_and_nothing_is_lost(autojump_clock):
    config = config_for_tests(write_timeout_s=30.0, scripted_delay_ms=1)
    async with open_hub(config) as server:
        async with server.connect(user_id="lagging", capacity_bytes=2048) as conn:
            await conn.send({"type": "user_message", "text": "[[stream:400]] a long answer please"})
            await trio.sleep(2)  # reads nothing while the run streams
            events = []
            while not events or events[-1]["type"] != "agent_completed":
                events.append(await conn.receive())
            deltas = [e["delta"] for e in events if e["type"] == "text_delta"]
            assert "".join(deltas) == events[-1]["text"]
            assert len(deltas) < 400  # merged while behind
            assert server.hub.metrics.deltas_merged._value.get() == 400 - len(deltas)
            seqs = [e["seq"] for e in conn.received]
            assert seqs == list(range(1, len(seqs) + 1))


async def test_a_dropped_client_cancels_its_runs_and_nothing_else(autojump_clock):
    async with open_hub(config_for_tests(scripted_delay_ms=50)) as server:
        async with server.connect(user_id="stays") as stays:
            async with server.connect(user_id="drops") as drops:
                await drops.send({"type": "user_message", "text": "[[stream:100]] long"})
                await drops.until("text_delta")
                drops.client.drop()
            events = await stays.run(CALC)
            assert events[-1]["type"] == "agent_completed"
            with trio.fail_after(5):
                while "drops" in server.hub.users:
                    await trio.sleep(0.05)
            m = server.hub.metrics
            assert m.runs_finished.labels("cancelled", "disconnect")._value.get() == 1
            assert m.connections_closed.labels("1006")._value.get() == 1
        await settle(server.hub)


async def test_the_peers_close_code_is_recorded(autojump_clock):
    async with open_hub() as server:
        async with server.connect(user_id="leaver") as conn:
            await conn.client.close(4000)
            with pytest.raises(ConnectionEnded):
                while True:
                    await conn.receive()
        with trio.fail_after(5):
            while server.hub.sessions:
                await trio.sleep(0.05)
        assert server.hub.metrics.connections_closed.labels("4000")._value.get() == 1


async def test_a_run_holds_its_slot_until_its_terminal_event_is_out(autojump_clock):
    """With max_runs_per_user=1, a client never sees two runs open on the
    wire, even when recording an outcome takes a while: the next run starts
    only after the previous one's terminal event."""
    from netra.store import MemoryStore

    class SlowToRecord(MemoryStore):
        async def finish_run(self, outcome):
            await trio.sleep(1.0)
            await super().finish_run(outcome)

    config = config_for_tests(max_runs_per_user=1)
    async with open_hub(config, store=SlowToRecord()) as server:
        async with server.connect(user_id="one") as conn:
            for i in range(3):
                await conn.send({"type": "user_message", "text": CALC, "id": f"m{i}"})
            open_runs: set[str] = set()
            most = ended = 0
            with trio.fail_after(30):
                while ended < 3:
                    event = await conn.receive()
                    if event["type"] == "agent_started":
                        open_runs.add(event["run_id"])
                        most = max(most, len(open_runs))
                    elif event["type"] in ("agent_completed", "agent_error", "agent_cancelled"):
                        open_runs.discard(event["run_id"])
                        ended += 1
            assert most == 1
