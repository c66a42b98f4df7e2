"""Conversations that last, through the real server: the memory store
(what ``NETRA_DATABASE_URL=none`` runs on) and SQLite always, PostgreSQL when
one answers (see tests/_backends.py). What needs a database that outlives
the server, or one that can fail, runs on the SQL backends only."""

from __future__ import annotations

from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import trio

from netra.client import RunRefused, connect
from netra.models.scripted import ScriptedModel
from netra.store import MemoryStore
from netra.testing import config_for_tests, open_server, token_for

from .conftest import settle
from .test_golden_path import CALC, assert_run_shape
from .test_store import ALL_BACKENDS, backend_named


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request, tmp_path):
    return backend_named(request, request.param, tmp_path)


@attrs.define(eq=False)
class RecordingModel:
    """The scripted model, keeping the requests it was given."""

    name: str = "scripted"
    inner: ScriptedModel = attrs.field(factory=lambda: ScriptedModel(delay_ms=0))
    requests: list = attrs.field(factory=list)

    def stream(self, request):
        self.requests.append(request)
        return self.inner.stream(request)


@asynccontextmanager
async def stored_server(backend, **overrides):
    model = overrides.pop("model", None) or RecordingModel(
        inner=ScriptedModel(delay_ms=overrides.get("scripted_delay_ms", 0.0))
    )
    config = config_for_tests(database_url=backend.url, store_pool_size=4, **overrides)
    store = MemoryStore() if backend.name == "memory" else "config"
    async with (
        open_server(config, model=model, store=store) as server,
        httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
    ):
        yield Stored(server, http)


@attrs.frozen
class Stored:
    server: object
    http: httpx.AsyncClient

    def __getattr__(self, name):
        return getattr(self.server, name)


def auth(server, user: str) -> dict:
    return {"Authorization": f"Bearer {token_for(server, user)}"}


async def test_history_survives_reconnect_and_reaches_the_model(any_backend):
    async with stored_server(any_backend, history_window=10) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "ann")) as conn:
                first = await conn.collect("my name is Ann")
                thread = first[0].raw["thread_id"]
            async with connect(server.ws_url, token_for(server, "ann")) as conn:
                second = await conn.collect(CALC, thread_id=thread)
                assert_run_shape(second)
            sent = server.hub.model.requests[-1].messages
            assert [m.role for m in sent[:3]] == ["system", "user", "assistant"]
            assert sent[1].content == "my name is Ann"
            assert sent[2].content == first[-1].raw["text"]
            body = (await server.http.get(f"/api/threads/{thread}", headers=auth(server, "ann"))).json()
            assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant"]
            assert [r["status"] for r in body["runs"]] == ["completed", "completed"]
            assert body["runs"][1]["tool_calls"][0]["name"] == "calculator"
            assert body["runs"][1]["tool_calls"][0]["result"] == 42
            listed = (await server.http.get("/api/threads", headers=auth(server, "ann"))).json()
            assert [t["id"] for t in listed["threads"]] == [thread]


async def test_partial_answer_of_a_run_cancelled_by_disconnect_is_kept(any_backend):
    async with stored_server(any_backend, scripted_delay_ms=30) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "bo")) as conn:
                deltas, thread = [], None
                async for event in conn.run("[[stream:50]] tell me a long story"):
                    thread = event.raw["thread_id"]
                    if event.type == "text_delta":
                        deltas.append(event.raw["delta"])
                        if len(deltas) == 3:
                            break
            await settle(server.hub)
            body = (await server.http.get(f"/api/threads/{thread}", headers=auth(server, "bo"))).json()
            run = body["runs"][0]
            assert run["status"] == "cancelled" and run["cancel_reason"] == "disconnect"
            answer = next(m for m in body["messages"] if m["role"] == "assistant")["text"]
            assert answer.startswith("".join(deltas)) and len(answer) < 200


async def test_a_message_cut_short_by_a_disconnect_can_be_sent_again(any_backend):
    """docs/protocol.md section 9: after a disconnect, resending the message
    with the same id is safe, and it gets its answer."""
    story = "[[stream:20]] tell me a story"
    async with stored_server(any_backend, scripted_delay_ms=30) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "di")) as conn:
                thread = (await conn.collect("hello", id="first"))[0].raw["thread_id"]
                async for event in conn.run(story, thread_id=thread, id="story"):
                    if event.type == "text_delta":
                        cut = event.raw["run_id"]
                        break
            await settle(server.hub)
            async with connect(server.ws_url, token_for(server, "di")) as conn:
                events = await conn.collect(story, thread_id=thread, id="story")
                assert events[-1].type == "agent_completed"
                answer = events[-1].raw["run_id"]
                assert answer != cut
                with pytest.raises(RunRefused) as refused:  # answered now: a duplicate
                    await conn.collect(story, thread_id=thread, id="story")
                assert refused.value.raw["run_id"] == answer
            body = (await server.http.get(f"/api/threads/{thread}", headers=auth(server, "di"))).json()
            assert [(r["status"], r["cancel_reason"]) for r in body["runs"]] == [
                ("completed", None), ("cancelled", "disconnect"), ("completed", None),
            ]  # fmt: skip
            assert [r["id"] for r in body["runs"]][1:] == [cut, answer]


async def test_threads_are_private(any_backend):
    async with stored_server(any_backend) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "owner")) as conn:
                thread = (await conn.collect("secret plans"))[0].raw["thread_id"]
            async with connect(server.ws_url, token_for(server, "intruder")) as conn:
                with pytest.raises(RunRefused) as refused:
                    await conn.collect("let me in", thread_id=thread)
                assert refused.value.code == "not_found"
            for method in ("GET", "DELETE"):
                answer = await server.http.request(method, f"/api/threads/{thread}", headers=auth(server, "intruder"))
                assert answer.status_code == 404 and answer.json()["code"] == "not_found"
            assert (await server.http.get("/api/threads", headers=auth(server, "intruder"))).json() == {"threads": []}
            assert (await server.http.get("/api/threads")).status_code == 401
            bad = await server.http.get("/api/threads?limit=abc", headers=auth(server, "owner"))
            assert bad.status_code == 400 and bad.json()["code"] == "bad_request"
            deleted = await server.http.delete(f"/api/threads/{thread}", headers=auth(server, "owner"))
            assert deleted.status_code == 204
            again = await server.http.get(f"/api/threads/{thread}", headers=auth(server, "owner"))
            assert again.status_code == 404


async def test_message_ids_are_idempotent_across_processes(backend):
    async with stored_server(backend) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "cy")) as conn:
                first = await conn.collect("hello", id="start-me")
                thread, first_run = first[0].raw["thread_id"], first[0].raw["run_id"]
                again = await conn.collect("again", thread_id=thread, id="retry-me")
                # at once, on the same server: the store refuses the retry too
                with pytest.raises(RunRefused) as refused:
                    await conn.collect("hello", id="start-me")
                assert (refused.value.raw["run_id"], refused.value.raw["thread_id"]) == (first_run, thread)
    # a new server process on the same database has no memory of its own
    async with stored_server(backend) as server:
        with trio.fail_after(20):
            async with connect(server.ws_url, token_for(server, "cy")) as conn:
                with pytest.raises(RunRefused) as refused:
                    await conn.collect("again", thread_id=thread, id="retry-me")
                assert refused.value.code == "bad_request"
                assert refused.value.raw["run_id"] == again[0].raw["run_id"]
                # the retry of the message that started the thread, whose
                # events (and so the thread's id) the client may never have seen
                with pytest.raises(RunRefused) as refused:
                    await conn.collect("hello", id="start-me")
                assert (refused.value.raw["run_id"], refused.value.raw["thread_id"]) == (first_run, thread)
                # the same id is still free on another thread
                other = await conn.collect("elsewhere", id="retry-me")
                assert other[-1].type == "agent_completed"
            body = (await server.http.get(f"/api/threads/{thread}", headers=auth(server, "cy"))).json()
            assert len(body["runs"]) == 2
            listed = (await server.http.get("/api/threads", headers=auth(server, "cy"))).json()["threads"]
            assert len(listed) == 2


async def test_hundred_concurrent_users_each_recorded_once(any_backend):
    async with stored_server(any_backend, max_runs=128) as server:
        threads: dict[str, str] = {}

        async def user(n: int) -> None:
            name = f"user{n:03d}"
            async with connect(server.ws_url, token_for(server, name)) as conn:
                events = await conn.collect(CALC)
                assert events[-1].type == "agent_completed"
                threads[name] = events[0].raw["thread_id"]

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(user, n)
            await settle(server.hub)
            assert server.hub.store.stats().in_use == 0
            for name, thread in threads.items():
                listed = (await server.http.get("/api/threads", headers=auth(server, name))).json()["threads"]
                assert [t["id"] for t in listed] == [thread]
                body = (await server.http.get(f"/api/threads/{thread}", headers=auth(server, name))).json()
                assert len(body["runs"]) == 1 and body["runs"][0]["status"] == "completed"
                assert body["runs"][0]["user_id"] == name


async def test_store_outage_fails_cleanly_and_recovers(backend):
    async with stored_server(backend, store_timeout_s=0.5) as server:
        with trio.fail_after(40):
            async with connect(server.ws_url, token_for(server, "dee")) as conn:
                assert_run_shape(await conn.collect(CALC))
                assert (await server.http.get("/readyz")).status_code == 200
                async with backend.outage():
                    with pytest.raises(RunRefused) as refused:
                        await conn.collect(CALC, id="retry-after-outage")
                    assert refused.value.code == "store_error" and refused.value.raw["ref"] == "retry-after-outage"
                    await conn.ping()  # the connection and the server keep serving
                    assert (await server.http.get("/healthz")).status_code == 200
                    ready = await server.http.get("/readyz")
                    assert ready.status_code == 503 and "store unavailable" in ready.json()["problems"]
                for _ in range(100):  # the pool reconnects on its own; the same id may be retried
                    try:
                        events = await conn.collect(CALC, id="retry-after-outage")
                        break
                    except RunRefused:
                        await trio.sleep(0.1)
                assert_run_shape(events)
                assert (await server.http.get("/readyz")).status_code == 200
        await settle(server.hub)
