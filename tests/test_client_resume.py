"""netra.client resumes by itself: a connection cut mid-stream is replaced
and the run being streamed completes with no event lost or repeated."""

from __future__ import annotations

import trio

from netra.client import connect
from netra.testing import config_for_tests, open_server, token_for

from .conftest import settle


async def test_the_client_resumes_a_cut_connection_and_the_answer_completes():
    config = config_for_tests(resume_window_s=30.0, scripted_delay_ms=20)
    async with open_server(config) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "kim"), record=True) as conn:
                events = []
                async for event in conn.run("[[stream:40]] tell me a story"):
                    events.append(event)
                    if sum(e.type == "text_delta" for e in events) == 5:
                        # the network drops under the client: a reset, no close frame
                        [session] = [s for s in server.hub.sessions if s.identity.user_id == "kim"]
                        session.transport.abort()
                assert events[-1].type == "agent_completed"
                assert "".join(e.raw["delta"] for e in events if e.type == "text_delta") == events[-1].raw["text"]
                assert conn.resumes == 1 and conn.resyncs == 0
                seqs = [r.seq for r in conn.received if r.type != "resumed"]
                assert seqs == list(range(1, len(seqs) + 1))  # every event once, in order
                assert (await conn.collect("and now?"))[-1].type == "agent_completed"  # it goes on
        m = server.hub.metrics
        assert m.sessions_resumed.labels("resumed")._value.get() == 1
        assert m.runs_finished.labels("completed", "")._value.get() == 2
        await settle(server.hub)


async def test_a_client_that_closes_does_not_resume():
    config = config_for_tests(resume_window_s=30.0)
    async with open_server(config) as server:
        with trio.fail_after(10):
            async with connect(server.ws_url, token_for(server, "lee")) as conn:
                await conn.collect("hi")
            assert conn.resumes == 0
        await settle(server.hub)
