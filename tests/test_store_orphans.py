"""Runs that lose their node, and retries of their message ids.

A node (a process with its store open) that dies leaves its runs
``running``: the store closes them as failed ``node_lost`` when a node opens
it next (or on request), never the runs of a node that is still alive. And
a message whose run was cut short from outside (its connection lost, the
server drained, its node died) may be sent again with the same id: the
retry gets a new run and the id moves to it; a retry of a message that was
answered, or is still being answered, is a duplicate pointing at that run.

The retry rules hold on every backend (memory included); node liveness is
for the SQL ones (the memory store has no other node).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from netra.store import NODE_LOST, RunStart, Store

from ._backends import Backend, PgDatabase, uid
from .test_store import (
    ALL_BACKENDS,
    IO_TIMEOUT,
    backend_named,
    opened,
    outcome_of,
    rows,
    start_of,
)


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return backend_named(request, request.param, tmp_path)


async def run_of(store: Store, user: str, thread_id: str, run_id: str) -> Any:
    [run] = [r for r in (await store.get_thread(user, thread_id))[2] if r.id == run_id]
    return run


# -- runs of dead nodes ----------------------------------------------------------


async def test_a_dead_nodes_runs_are_closed_a_live_nodes_are_not(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    user = uid("user")
    config = backend.config()
    with trio.fail_after(IO_TIMEOUT):
        async with opened(config) as alive:
            async with opened(config) as doomed:
                starts = [start_of(user, text=f"question {i}") for i in range(3)]
                threads = [(await doomed.begin_run(s)).thread.id for s in starts]
                answered = start_of(user, thread_id=threads[0], text="answered")
                await doomed.begin_run(answered)
                await doomed.finish_run(outcome_of(answered, threads[0]))
                mine = start_of(user, text="the live node's")
                mine_thread = (await alive.begin_run(mine)).thread.id

                # a node opening now, and a sweep by a live node, see `doomed` alive
                async with opened(config) as third:
                    assert await third.close_orphaned_runs() == 0
                assert await alive.close_orphaned_runs() == 0
                assert (await run_of(alive, user, threads[1], starts[1].run_id)).status == "running"
            # `doomed` is gone (its store closed with runs unfinished: as if killed)
            assert await alive.close_orphaned_runs() == 3
            for s, thread in zip(starts, threads, strict=True):
                run = await run_of(alive, user, thread, s.run_id)
                assert (run.status, run.error_code, run.cancel_reason) == ("failed", NODE_LOST, None)
                assert run.ended_at is not None and run.ended_at >= s.started_at
                _, messages, _ = await alive.get_thread(user, thread)
                assert messages[0].text == s.text  # what it recorded stays
            assert (await run_of(alive, user, threads[0], answered.run_id)).status == "completed"
            assert (await run_of(alive, user, mine_thread, mine.run_id)).status == "running"
            assert await alive.close_orphaned_runs() == 0
        # `alive` closed too: the next node to open closes its run
        caplog.clear()
        async with opened(config) as restarted:
            assert (await run_of(restarted, user, mine_thread, mine.run_id)).error_code == NODE_LOST
        assert "closed 1 runs left running" in caplog.text  # the operator is told


async def test_a_cluster_may_close_a_named_nodes_runs(backend: Backend) -> None:
    """Without liveness locks (``recover_orphans=False`` at open), a node's
    runs are closed only when someone names it; its late outcome then
    changes nothing."""
    user = uid("user")
    config = backend.config()
    with trio.fail_after(IO_TIMEOUT):
        async with opened(config) as lost, opened(config) as survivor:
            s = start_of(user)
            thread = (await lost.begin_run(s)).thread.id
            with pytest.raises(ValueError):
                await survivor.close_orphaned_runs(survivor.node_id)
            assert await survivor.close_orphaned_runs(uid("node-never-seen")) == 0
            assert await survivor.close_orphaned_runs(lost.node_id) == 1
            await lost.finish_run(outcome_of(s, thread))  # too late: already closed
            run = await run_of(survivor, user, thread, s.run_id)
            assert (run.status, run.error_code) == ("failed", NODE_LOST)
            assert [m.role for m in (await survivor.get_thread(user, thread))[1]] == ["user"]


async def test_runs_recorded_before_nodes_existed_are_closed(backend: Backend) -> None:
    """A database upgraded while it had runs running: those runs have no node
    and nobody can finish them."""
    user = uid("user")
    config = backend.config()
    with trio.fail_after(IO_TIMEOUT):
        async with opened(config) as store:
            s = start_of(user)
            thread = (await store.begin_run(s)).thread.id
            await rows(store, "UPDATE runs SET node_id = NULL WHERE id = ? RETURNING id", s.run_id)
            assert await store.close_orphaned_runs() == 1
            assert (await run_of(store, user, thread, s.run_id)).error_code == NODE_LOST


async def test_open_can_leave_orphans_alone(backend: Backend) -> None:
    user = uid("user")
    with trio.fail_after(IO_TIMEOUT):
        async with opened(backend.config()) as first:
            s = start_of(user)
            thread = (await first.begin_run(s)).thread.id
        store = type(first)(backend.config(), recover_orphans=False)
        await store.open()
        try:
            assert (await run_of(store, user, thread, s.run_id)).status == "running"
            assert await store.close_orphaned_runs() == 1
        finally:
            await store.aclose()


async def test_sqlite_node_locks_do_not_pile_up(tmp_path: Path) -> None:
    backend = Backend("sqlite", f"sqlite:///{tmp_path}/netra.sqlite3")
    folder = tmp_path / "netra.sqlite3.nodes"
    with trio.fail_after(IO_TIMEOUT):
        async with opened(backend.config()) as a:
            await a.begin_run(start_of(uid("user")))
            assert len(list(folder.iterdir())) == 1
            async with opened(backend.config()):
                assert len(list(folder.iterdir())) == 2
        assert list(folder.iterdir()) == []
        async with opened(backend.config()) as b:  # closes a's run; b's own lock only
            assert len(list(folder.iterdir())) == 1
            assert await b.close_orphaned_runs() == 0


@pytest.mark.postgres
async def test_postgres_node_lock_is_taken_back_after_a_lost_connection(pg_database: PgDatabase) -> None:
    """The lock lives on one connection; if it breaks, the node is taken for
    dead until ping (that /readyz runs) takes the lock back."""
    backend = Backend("postgres", pg_database.url, pg_database)
    user = uid("user")
    config = backend.config()
    with trio.fail_after(IO_TIMEOUT):
        async with opened(config) as node:
            s = start_of(user)
            thread = (await node.begin_run(s)).thread.id
            pid = node._claims._conn.info.backend_pid  # type: ignore[union-attr]
            await trio.to_thread.run_sync(_terminate, pg_database.admin_url, pid)
            await node.ping()
            async with opened(config) as other:
                assert await other.close_orphaned_runs() == 0
                assert (await run_of(other, user, thread, s.run_id)).status == "running"


def _terminate(admin_url: str, pid: int) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


# -- retries of a message id ----------------------------------------------------------


ENDINGS = [
    # (status, cancel_reason, error_code): does a retry start a new run?
    pytest.param("cancelled", "disconnect", None, True, id="disconnect"),
    pytest.param("cancelled", "shutdown", None, True, id="shutdown"),
    pytest.param("failed", None, NODE_LOST, True, id="node_lost"),
    pytest.param("completed", None, None, False, id="completed"),
    pytest.param("failed", None, "llm_error", False, id="failed"),
    pytest.param("cancelled", "client", None, False, id="client-cancel"),
    pytest.param("cancelled", "interrupted", None, False, id="interrupted"),
    pytest.param("cancelled", "timeout", None, False, id="timeout"),
    pytest.param(None, None, None, False, id="still-running"),
]


@pytest.mark.parametrize(("status", "reason", "code", "retried"), ENDINGS)
async def test_retry_on_a_thread(any_backend: Backend, status: str | None, reason: str | None,
                                 code: str | None, retried: bool) -> None:  # fmt: skip
    user = uid("user")
    async with opened(any_backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            thread = (await store.begin_run(start_of(user, at=999.0))).thread.id
            first = start_of(user, thread_id=thread, client_id="c-1", text="again?", at=1000.0)
            await store.begin_run(first)
            if status is not None:
                await store.finish_run(outcome_of(
                    first, thread, status=status, cancel_reason=reason, error_code=code,
                    answer_text="partial",
                ))  # fmt: skip
            retry = start_of(user, thread_id=thread, client_id="c-1", text="again?", at=1001.0)
            started = await store.begin_run(retry)
            _, messages, runs = await store.get_thread(user, thread)
            if not retried:
                assert (started.duplicate_of, started.replaces) == (first.run_id, None)
                assert len(runs) == 2
                return
            assert (started.duplicate_of, started.replaces) == (None, first.run_id)
            assert [r.id for r in runs][1:] == [first.run_id, retry.run_id]
            # the old run keeps what it recorded; the id now names the new message
            assert [(m.text, m.run_id, m.client_id) for m in messages[1:]] == [
                ("again?", first.run_id, None), ("partial", first.run_id, None),
                ("again?", retry.run_id, "c-1"),
            ]  # fmt: skip
            # a retry of the retry, still running: a duplicate of the new run
            third = await store.begin_run(start_of(user, thread_id=thread, client_id="c-1"))
            assert third.duplicate_of == retry.run_id


async def test_retry_of_a_thread_starting_message(any_backend: Backend) -> None:
    """Resent unchanged (no thread_id), a message that started a thread whose
    run was cut short starts a new thread; the old one keeps its record."""
    user = uid("user")
    async with opened(any_backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            first = start_of(user, client_id="hello-1", text="hello")
            old = (await store.begin_run(first)).thread
            await store.finish_run(outcome_of(first, old.id, status="cancelled", cancel_reason="disconnect"))
            retry = start_of(user, client_id="hello-1", text="hello")
            started = await store.begin_run(retry)
            assert (started.duplicate_of, started.replaces) == (None, first.run_id)
            assert started.thread.id == retry.new_thread_id != old.id
            assert {t.id for t in await store.list_threads(user)} == {old.id, started.thread.id}
            _, old_messages, [old_run] = await store.get_thread(user, old.id)
            assert old_run.status == "cancelled" and {m.client_id for m in old_messages} == {None}
            # the id now names the new thread's message: its retries are duplicates of it
            again = await store.begin_run(start_of(user, client_id="hello-1"))
            assert (again.duplicate_of, again.thread.id) == (retry.run_id, started.thread.id)
            # and the old thread is free of it: the id is a new message there
            assert (await store.begin_run(start_of(user, thread_id=old.id, client_id="hello-1"))).duplicate_of is None


async def test_retry_on_the_thread_a_message_started(any_backend: Backend) -> None:
    """A client that saw the thread's id may resend the thread-starting
    message on that thread: the run continues there, and the id (in both of
    its scopes) names the new run."""
    user = uid("user")
    async with opened(any_backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            first = start_of(user, client_id="hello-2")
            thread = (await store.begin_run(first)).thread.id
            await store.finish_run(outcome_of(first, thread, status="failed", error_code=NODE_LOST, answer_text=""))
            retry = start_of(user, thread_id=thread, client_id="hello-2")
            assert (await store.begin_run(retry)).replaces == first.run_id
            for again in (start_of(user, thread_id=thread, client_id="hello-2"), start_of(user, client_id="hello-2")):
                started = await store.begin_run(again)
                assert (started.duplicate_of, started.thread.id) == (retry.run_id, thread)


async def test_concurrent_retries_start_one_run(any_backend: Backend) -> None:
    user = uid("user")
    async with opened(any_backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            first = start_of(user, client_id="burst")
            thread = (await store.begin_run(first)).thread.id
            await store.finish_run(outcome_of(first, thread, status="cancelled", cancel_reason="shutdown"))
            for scope in (thread, None):  # on the thread, and as a thread-starting message
                results: list[tuple[RunStart, Any]] = []

                async def retry(s: RunStart, results: list[tuple[RunStart, Any]] = results) -> None:
                    results.append((s, await store.begin_run(s)))

                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(retry, start_of(user, thread_id=scope, client_id="burst"))
                winners = [s.run_id for s, r in results if r.duplicate_of is None]
                assert len(winners) == 1, results
                assert {r.duplicate_of for _, r in results if r.duplicate_of} == set(winners)
                # the winner is cut short too: the next burst starts from it
                [(won, answer)] = [(s, r) for s, r in results if r.duplicate_of is None]
                await store.finish_run(outcome_of(won, answer.thread.id, status="cancelled", cancel_reason="disconnect"))


async def test_concurrent_retries_from_two_nodes_start_one_run(backend: Backend) -> None:
    """Two servers on one database each take a retry of the same id at once:
    the conditional release lets one through, the others find its run."""
    user = uid("user")
    config = backend.config()
    async with opened(config) as one, opened(config) as two:
        with trio.fail_after(IO_TIMEOUT):
            for attempt in range(6):
                cid = f"twice-{attempt}"
                first = start_of(user, client_id=cid)
                thread = (await one.begin_run(first)).thread.id
                await one.finish_run(outcome_of(first, thread, status="cancelled", cancel_reason="disconnect"))
                scope = thread if attempt % 2 else None  # on the thread, or as a thread-starting message
                results: list[tuple[RunStart, Any]] = []

                async def retry(store: Store, s: RunStart, results: list[tuple[RunStart, Any]] = results) -> None:
                    results.append((s, await store.begin_run(s)))

                async with trio.open_nursery() as nursery:
                    for i in range(6):
                        nursery.start_soon(retry, (one, two)[i % 2], start_of(user, thread_id=scope, client_id=cid))
                [(won, answer)] = [(s, r) for s, r in results if r.duplicate_of is None]
                assert answer.replaces == first.run_id
                assert {r.duplicate_of for _, r in results if r.duplicate_of is not None} == {won.run_id}
                _, messages, _ = await two.get_thread(user, answer.thread.id)
                assert [m.run_id for m in messages if m.client_id == cid] == [won.run_id]
