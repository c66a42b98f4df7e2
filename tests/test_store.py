"""One suite for every store backend.

The memory store (``database_url = "none"``) and SQLite always run (SQLite on
a file under tmp_path). PostgreSQL runs when NETRA_TEST_DATABASE_URL names a
server that answers; the session then works in a database of its own,
created here and dropped afterwards. Otherwise the PostgreSQL cases are
skipped with the reason, never passed silently.

Every test id is random, so tests sharing that database never see each
other's rows. Tests of the Store interface (the ``store`` fixture) check
through the interface only, so the memory store answers them too; tests of
SQL matters (migrations, cascades, outages) take the SQL-only ``backend``
fixture, and ``store._call(op, ...)`` runs a raw query in the backend's own
worker/transaction machinery, so checks on rows stay backend-neutral.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from netra.config import Config
from netra.errors import NotFound, StoreError
from netra.store import (
    MemoryStore,
    PostgresStore,
    RunOutcome,
    RunStart,
    SQLiteStore,
    Store,
    ToolCallRecord,
    _migrations,
    _schema,
    open_store,
)

from ._backends import POOL, Backend, uid  # noqa: F401  (fixtures come from conftest)

IO_TIMEOUT = 30.0

#: Every backend: the Store interface must mean the same on each.
ALL_BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def backend_named(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> Backend:
    """The ``backend`` fixture's backends, plus "memory" (database_url none)."""
    if name == "memory":
        return Backend("memory", "none")
    if name == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path}/db/netra.sqlite3")
    pg = request.getfixturevalue("pg_database")
    return Backend("postgres", pg.url, pg)


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Store]:
    store = open_store(config)
    assert store is not None
    with trio.fail_after(IO_TIMEOUT):
        await store.open()
    try:
        yield store
    finally:
        with trio.fail_after(IO_TIMEOUT):
            await store.aclose()


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return backend_named(request, request.param, tmp_path)


@pytest.fixture
async def store(any_backend: Backend) -> AsyncIterator[Store]:
    async with opened(any_backend.config()) as s:
        yield s


# -- helpers --------------------------------------------------------------------


def start_of(user: str, *, thread_id: str | None = None, text: str = "hello",
             client_id: str | None = None, at: float | None = None) -> RunStart:  # fmt: skip
    return RunStart(
        run_id=uid("run"),
        thread_id=thread_id,
        new_thread_id=uid("thread"),
        user_id=user,
        agent="echo",
        text=text,
        user_message_id=uid("msg"),
        client_id=client_id,
        started_at=time.time() if at is None else at,
    )


def outcome_of(start: RunStart, thread_id: str, **changes: Any) -> RunOutcome:
    values: dict[str, Any] = {
        "run_id": start.run_id,
        "thread_id": thread_id,
        "status": "completed",
        "ended_at": start.started_at + 0.5,
        "duration_ms": 500,
        "answer_message_id": uid("msg"),
        "answer_text": f"answer to {start.text}",
        "usage": {"input_tokens": 3, "output_tokens": 5},
    }
    return RunOutcome(**(values | changes))


def _rows(db: _schema.Db, query: str, *params: Any) -> list[Any]:
    return db.all(query, *params)


async def rows(store: Store, query: str, *params: Any) -> list[Any]:
    return await store._call(_rows, query, *params)  # type: ignore[attr-defined]


async def count(store: Store, table: str, where: str, *params: Any) -> int:
    return (await rows(store, f"SELECT COUNT(*) FROM {table} WHERE {where}", *params))[0][0]


# Counts through the Store interface, for every backend.


async def thread_counts(store: Store, user: str, thread_id: str) -> tuple[int, int]:
    """(runs, messages) of one thread."""
    _, messages, runs = await store.get_thread(user, thread_id)
    return len(runs), len(messages)


async def user_runs(store: Store, user: str) -> list[Any]:
    """Every run of every thread of ``user``."""
    runs = []
    for thread in await store.list_threads(user, limit=10_000):
        runs.extend((await store.get_thread(user, thread.id))[2])
    return runs


# -- tests --------------------------------------------------------------------


async def test_migrations_are_idempotent(backend: Backend) -> None:
    config = backend.config()
    async with trio.open_nursery() as nursery:  # two servers starting at once
        for _ in range(2):
            nursery.start_soon(_open_and_ping, config)
    async with opened(config) as store:
        assert isinstance(store, Store)
        versions = [r[0] for r in await rows(store, "SELECT version FROM schema_version ORDER BY version")]
        assert versions == [v for v, _ in _migrations.MIGRATIONS]
        newer = _migrations.MIGRATIONS[-1][0] + 1000
        await rows(store, "INSERT INTO schema_version VALUES (?, 0) RETURNING version", newer)
        try:
            with pytest.raises(StoreError, match="newer"):
                async with opened(config):
                    pass
        finally:
            await rows(store, "DELETE FROM schema_version WHERE version = ? RETURNING version", newer)


async def _open_and_ping(config: Config) -> None:
    async with opened(config) as store:
        with trio.fail_after(IO_TIMEOUT):
            await store.ping()


async def test_begin_run_creates_thread_message_and_run(store: Store) -> None:
    user = uid("user")
    start = start_of(user, text="What is   the\nweather?", client_id=uid("c"))
    with trio.fail_after(IO_TIMEOUT):
        started = await store.begin_run(start)
        assert started.duplicate_of is None
        thread = started.thread
        assert (thread.id, thread.user_id) == (start.new_thread_id, user)
        assert thread.title == "What is the weather?"
        assert thread.created_at == thread.updated_at == start.started_at
        got, messages, runs = await store.get_thread(user, thread.id)
        assert got == thread
        [msg] = messages
        assert (msg.id, msg.role, msg.text, msg.run_id, msg.client_id) == (
            start.user_message_id, "user", start.text, start.run_id, start.client_id,
        )  # fmt: skip
        [run] = runs
        assert (run.id, run.status, run.agent, run.user_id) == (start.run_id, "running", "echo", user)
        assert run.started_at == start.started_at and run.ended_at is None
        assert run.usage == {} and run.tool_calls == ()

        later = start_of(user, thread_id=thread.id, text="and tomorrow?", at=start.started_at + 5)
        again = await store.begin_run(later)
        assert again.duplicate_of is None
        assert again.thread.updated_at == later.started_at
        assert again.thread.title == thread.title


async def test_begin_run_on_someone_elses_thread_is_not_found(store: Store) -> None:
    owner, other = uid("user"), uid("user")
    with trio.fail_after(IO_TIMEOUT):
        thread = (await store.begin_run(start_of(owner))).thread
        for intruder_start in (
            start_of(other, thread_id=thread.id),
            start_of(owner, thread_id=uid("missing")),
        ):
            with pytest.raises(NotFound):
                await store.begin_run(intruder_start)
        assert await thread_counts(store, owner, thread.id) == (1, 1)
        assert await store.list_threads(other) == []


async def test_duplicate_client_id_writes_nothing(store: Store) -> None:
    user = uid("user")
    with trio.fail_after(IO_TIMEOUT):
        first = start_of(user, client_id="c-1")
        thread = (await store.begin_run(first)).thread
        retry = start_of(user, thread_id=thread.id, client_id="c-1")
        started = await store.begin_run(retry)
        assert started.duplicate_of == first.run_id
        assert started.thread.id == thread.id
        assert await thread_counts(store, user, thread.id) == (1, 1)
        # Another id, no id at all (twice), or an id of this thread starting a
        # new thread: new runs.
        for s in (
            start_of(user, thread_id=thread.id, client_id="c-2"),
            start_of(user, thread_id=thread.id),
            start_of(user, thread_id=thread.id),
            start_of(user, client_id="c-2"),
        ):
            assert (await store.begin_run(s)).duplicate_of is None
        assert (await thread_counts(store, user, thread.id))[0] == 4


async def test_a_retried_thread_starting_message_starts_nothing(store: Store) -> None:
    """The retry of a message that started a thread (the client may never have
    seen the thread's id) finds that thread and its run, even when the two
    race, and writes nothing."""
    user, other = uid("user"), uid("user")
    with trio.fail_after(IO_TIMEOUT):
        first = start_of(user, client_id="hello-1")
        thread = (await store.begin_run(first)).thread
        retry = await store.begin_run(start_of(user, client_id="hello-1"))
        assert (retry.duplicate_of, retry.thread) == (first.run_id, thread)
        assert [t.id for t in await store.list_threads(user)] == [thread.id]
        # the same id from another user is that user's own first message
        assert (await store.begin_run(start_of(other, client_id="hello-1"))).duplicate_of is None

        await _race_one_winner(store, [start_of(user, client_id="race") for _ in range(10)])
        assert len(await store.list_threads(user)) == 2
        assert len(await user_runs(store, user)) == 2


async def test_concurrent_duplicates_start_one_run(store: Store) -> None:
    user = uid("user")
    with trio.fail_after(IO_TIMEOUT):
        thread = (await store.begin_run(start_of(user))).thread
        await _race_one_winner(store, [start_of(user, thread_id=thread.id, client_id="same") for _ in range(10)])
        assert (await thread_counts(store, user, thread.id))[0] == 2


async def _race_one_winner(store: Store, starts: list[RunStart]) -> None:
    """Begin all of ``starts`` (one client id) at once: exactly one starts a
    run, every other one is answered with that run."""
    results: list[str | None] = []

    async def go(s: RunStart) -> None:
        results.append((await store.begin_run(s)).duplicate_of)

    async with trio.open_nursery() as nursery:
        for s in starts:
            nursery.start_soon(go, s)
    assert results.count(None) == 1
    [winner] = {r for r in results if r is not None}
    assert winner in {s.run_id for s in starts} and results.count(winner) == len(starts) - 1


async def test_finish_run_records_the_outcome(store: Store) -> None:
    user = uid("user")
    with trio.fail_after(IO_TIMEOUT):
        done = start_of(user, text="use tools", at=1000.0)
        thread = (await store.begin_run(done)).thread
        calls = (
            ToolCallRecord(id="call-1", run_id=done.run_id, name="add", args={"a": 1, "b": 2},
                           result={"sum": 3}, duration_ms=7),
            ToolCallRecord(id="call-1", run_id=done.run_id, name="fail", args={},
                           error="boom", duration_ms=1),
        )  # fmt: skip
        await store.finish_run(outcome_of(done, thread.id, tool_calls=calls))

        cancelled = start_of(user, thread_id=thread.id, at=1010.0)
        await store.begin_run(cancelled)
        await store.finish_run(outcome_of(
            cancelled, thread.id, status="cancelled", answer_text="partial ans",
            cancel_reason="interrupted", usage={"output_tokens": 2},
        ))  # fmt: skip
        failed = start_of(user, thread_id=thread.id, at=1020.0)
        await store.begin_run(failed)
        failure = outcome_of(failed, thread.id, status="failed", answer_text="", error_code="llm_error")
        await store.finish_run(failure)
        await store.finish_run(failure)  # a retry changes nothing
        with pytest.raises(NotFound):
            await store.finish_run(outcome_of(start_of(user), thread.id))

        got, messages, runs = await store.get_thread(user, thread.id)
        assert got.updated_at == failure.ended_at
        assert [(m.role, m.text) for m in messages] == [
            ("user", "use tools"), ("assistant", "answer to use tools"),
            ("user", "hello"), ("assistant", "partial ans"),
            ("user", "hello"),  # the failed run had no text: no empty turn
        ]  # fmt: skip
        assert messages[1].run_id == done.run_id and messages[1].created_at == 1000.5
        r1, r2, r3 = runs
        assert (r1.status, r1.ended_at, r1.duration_ms) == ("completed", 1000.5, 500)
        assert r1.usage == {"input_tokens": 3, "output_tokens": 5}
        assert r1.tool_calls == calls
        assert (r2.status, r2.cancel_reason, r2.usage, r2.tool_calls) == (
            "cancelled", "interrupted", {"output_tokens": 2}, ()
        )
        assert (r3.status, r3.error_code, r3.cancel_reason) == ("failed", "llm_error", None)


async def test_odd_values_are_stored(store: Store) -> None:
    """NUL characters (which PostgreSQL refuses) and non-JSON values must not
    lose a run; PostgreSQL stores U+FFFD in place of NUL."""
    user = uid("user")
    with trio.fail_after(IO_TIMEOUT):
        start = start_of(user, text="nul\x00here")
        thread = (await store.begin_run(start)).thread
        call = ToolCallRecord(id="c", run_id=start.run_id, name="t", args={"k\x00": "v\x00"},
                              result=["x\x00", 1.5, None, "\\u0000"], error="e\x00")  # fmt: skip
        await store.finish_run(outcome_of(start, thread.id, answer_text="a\x00b", tool_calls=(call,)))
        _, messages, [run] = await store.get_thread(user, thread.id)
        assert [m.text.replace("\ufffd", "\x00") for m in messages] == ["nul\x00here", "a\x00b"]
        [stored] = run.tool_calls
        assert stored.result[1:] == [1.5, None, "\\u0000"]
        assert stored.result[0] in ("x\x00", "x\ufffd")


async def test_history_is_the_last_n_oldest_first(store: Store) -> None:
    user = uid("user")
    with trio.fail_after(IO_TIMEOUT):
        thread_id = None
        for i in range(4):
            s = start_of(user, thread_id=thread_id, text=f"q{i}", at=2000.0 + i)
            thread_id = (await store.begin_run(s)).thread.id
            await store.finish_run(outcome_of(s, thread_id, answer_text=f"a{i}"))
        assert thread_id is not None
        last = await store.history(thread_id, limit=3)
        assert [m.text for m in last] == ["a2", "q3", "a3"]
        assert [m.text for m in await store.history(thread_id, limit=100)][:2] == ["q0", "a0"]
        assert await store.history(thread_id, limit=0) == []
        assert await store.history(uid("missing"), limit=5) == []


async def test_list_get_delete_respect_ownership(store: Store) -> None:
    owner, other = uid("user"), uid("user")
    with trio.fail_after(IO_TIMEOUT):
        threads = await _three_threads(store, owner)
        await store.begin_run(start_of(other))
        listed = await store.list_threads(owner)
        assert [t.id for t in listed] == [t.id for t in reversed(threads)]  # newest first
        assert [t.id for t in await store.list_threads(owner, limit=1)] == [threads[-1].id]
        assert await store.list_threads(uid("nobody")) == []

        victim = threads[0]
        for intruder in (lambda: store.get_thread(other, victim.id),
                         lambda: store.delete_thread(other, victim.id),
                         lambda: store.get_thread(owner, uid("missing"))):  # fmt: skip
            with pytest.raises(NotFound):
                await intruder()
        await store.delete_thread(owner, victim.id)
        with pytest.raises(NotFound):
            await store.get_thread(owner, victim.id)
        with pytest.raises(NotFound):
            await store.delete_thread(owner, victim.id)
        assert await store.history(victim.id, limit=10) == []
        assert [t.id for t in await store.list_threads(owner)] == [t.id for t in reversed(threads[1:])]
        assert len((await store.get_thread(owner, threads[1].id))[2]) == 1  # others intact


async def _three_threads(store: Store, owner: str) -> list[Any]:
    threads = []
    for i in range(3):
        s = start_of(owner, text=f"t{i}", at=3000.0 + i)
        threads.append((await store.begin_run(s)).thread)
        call = ToolCallRecord(id="c", run_id=s.run_id, name="n", args={})
        await store.finish_run(outcome_of(s, threads[-1].id, tool_calls=(call,)))
    return threads


async def test_delete_cascades_to_every_row(backend: Backend) -> None:
    async with opened(backend.config()) as store:
        owner = uid("user")
        with trio.fail_after(IO_TIMEOUT):
            victim, kept, _ = await _three_threads(store, owner)
            run_ids = [r[0] for r in await rows(store, "SELECT id FROM runs WHERE thread_id = ?", victim.id)]
            assert await count(store, "tool_calls", "run_id = ?", run_ids[0]) == 1
            await store.delete_thread(owner, victim.id)
            assert await count(store, "messages", "thread_id = ?", victim.id) == 0
            assert await count(store, "runs", "thread_id = ?", victim.id) == 0
            assert await count(store, "tool_calls", "run_id = ?", run_ids[0]) == 0
            assert await count(store, "messages", "thread_id = ?", kept.id) == 2


async def test_many_concurrent_runs_are_each_recorded_once(store: Store) -> None:
    user = uid("user")
    high_water = 0
    with trio.fail_after(IO_TIMEOUT * 2):
        shared = [(await store.begin_run(start_of(user))).thread.id for _ in range(5)]
        base = len(await user_runs(store, user))

        async def one(i: int) -> None:
            nonlocal high_water
            s = start_of(user, thread_id=shared[i % 5] if i % 2 else None, client_id=f"c{i}")
            started = await store.begin_run(s)
            assert started.duplicate_of is None
            high_water = max(high_water, store.stats().in_use)
            await trio.lowlevel.checkpoint()
            await store.finish_run(outcome_of(s, started.thread.id))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)

        stats = store.stats()
        assert (stats.in_use, stats.waiting) == (0, 0)
        assert high_water <= stats.size
        runs = await user_runs(store, user)
        assert len(runs) == base + 100
        completed = {r.id for r in runs if r.status == "completed"}
        assert len(completed) == 100
        per_run: dict[str, int] = {}
        for thread in await store.list_threads(user, limit=1000):
            for m in (await store.get_thread(user, thread.id))[1]:
                if m.run_id in completed:
                    per_run[m.run_id] = per_run.get(m.run_id, 0) + 1
        assert len(per_run) == 100 and set(per_run.values()) == {2}


async def test_outage_raises_store_error_then_recovers(backend: Backend) -> None:
    async with opened(backend.config(store_timeout_s=1.0)) as store:
        user = uid("user")
        with trio.fail_after(IO_TIMEOUT):
            thread = (await store.begin_run(start_of(user))).thread
        async with backend.outage():
            with trio.fail_after(IO_TIMEOUT):
                with pytest.raises(StoreError) as caught:
                    await store.begin_run(start_of(user, thread_id=thread.id))
                assert not isinstance(caught.value.__cause__, StoreError)  # translated once
                if backend.pg is not None:  # SQLite readers are not blocked by a writer
                    with pytest.raises(StoreError):
                        await store.ping()
        with trio.fail_after(IO_TIMEOUT):
            while True:  # PostgreSQL: the pool reconnects with a backoff
                try:
                    started = await store.begin_run(start_of(user, thread_id=thread.id))
                    break
                except StoreError:
                    await trio.sleep(0.2)
            assert started.duplicate_of is None
            await store.ping()
        assert store.stats().in_use == 0


async def test_unopenable_sqlite_file_then_fixed(tmp_path: Path) -> None:
    """A directory where the file should be: open() fails with StoreError."""
    path = tmp_path / "netra.sqlite3"
    path.mkdir()
    config = Config(database_url=f"sqlite:///{path}", store_timeout_s=1.0)
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(StoreError) as caught:
            await SQLiteStore(config).open()
        assert isinstance(caught.value.__cause__, sqlite3.Error)
        path.rmdir()
        async with opened(config) as store:
            await store.begin_run(start_of(uid("user")))
        # Read-only: reads work, writes fail cleanly.
        async with opened(config.replace(database_url=f"sqlite:///{path}?mode=ro")) as ro:
            await ro.ping()
            with pytest.raises(StoreError):
                await ro.begin_run(start_of(uid("user")))


async def test_unreachable_postgres_is_store_error() -> None:
    """No server needed: a closed port fails open() within store_timeout_s."""
    config = Config(database_url="postgresql://netra:s3cret@127.0.0.1:1/none", store_timeout_s=1.0)
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(StoreError) as caught:
            await PostgresStore(config).open()
    assert "s3cret" not in str(caught.value) and "127.0.0.1" not in str(caught.value)


async def test_closed_store_raises_store_error(any_backend: Backend) -> None:
    async with opened(any_backend.config()) as store:
        pass
    with pytest.raises(StoreError):
        await store.ping()


async def test_sqlite_memory_and_default_locations(tmp_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT):
        store = open_store(Config(database_url="sqlite:///:memory:"))
        assert isinstance(store, SQLiteStore)
        await store.open()
        tempdir = store._tempdir
        assert tempdir is not None and Path(tempdir).is_dir()
        await store.begin_run(start_of(uid("user")))
        await store.aclose()
        assert not Path(tempdir).exists()

        data_dir = tmp_path / "data" / "nested"
        async with opened(Config(data_dir=str(data_dir))) as default:
            assert isinstance(default, SQLiteStore)
            await default.ping()
        assert (data_dir / "netra.sqlite3").is_file()


def test_open_store_picks_the_backend() -> None:
    def pick(url: str | None) -> Store:
        return open_store(Config(database_url=url))

    assert isinstance(pick("none"), MemoryStore) and isinstance(pick("NONE"), MemoryStore)
    assert isinstance(pick(None), SQLiteStore)
    assert isinstance(pick("sqlite:///x/y.db"), SQLiteStore)
    assert isinstance(pick("postgresql://u@h/db"), PostgresStore)
    assert isinstance(pick("postgres://u@h/db"), PostgresStore)
    for bad in ("mysql://user:s3cret@host/db", "sqlite://relative.db", "sqlite:///"):
        with pytest.raises(ValueError) as caught:
            pick(bad)
        assert "s3cret" not in str(caught.value)


async def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A database written by the first release (no thread client ids) is
    migrated on open: its threads stay readable, and new threads get
    thread-start idempotency."""
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        for statement in _migrations.statements(_migrations.MIGRATIONS[0][1], _schema.SQLITE):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute("INSERT INTO threads VALUES ('thr_old', 'ann', 'from before', 1.0, 1.0)")
        conn.execute("INSERT INTO messages (id, thread_id, role, text, run_id, client_id, created_at)"
                     " VALUES ('msg_old', 'thr_old', 'user', 'from before', 'run_old', 'c-old', 1.0)")
        conn.execute("INSERT INTO runs (id, thread_id, user_id, agent, status, started_at, usage)"
                     " VALUES ('run_old', 'thr_old', 'ann', 'assistant', 'completed', 1.0, '{}')")
    conn.close()
    async with opened(Config(database_url=f"sqlite:///{path}", store_pool_size=2)) as store:
        with trio.fail_after(IO_TIMEOUT):
            versions = [r[0] for r in await rows(store, "SELECT version FROM schema_version ORDER BY version")]
            assert versions == [v for v, _ in _migrations.MIGRATIONS]
            thread, messages, _ = await store.get_thread("ann", "thr_old")
            assert thread.title == "from before" and [m.client_id for m in messages] == ["c-old"]
            # the old thread's ids still count on it; a new thread starting with one is new
            retry = await store.begin_run(start_of("ann", thread_id="thr_old", client_id="c-old"))
            assert (retry.duplicate_of, retry.thread.id) == ("run_old", "thr_old")
            assert (await store.begin_run(start_of("ann", client_id="c-old"))).duplicate_of is None
            first = start_of("ann", client_id="c-new")
            await store.begin_run(first)
            assert (await store.begin_run(start_of("ann", client_id="c-new"))).duplicate_of == first.run_id
