"""The memory store's own promises: bounded memory, and no waiting.

Its rules are those of every store (tests/test_store.py runs the whole
suite on it); here is what only it promises: at most ``max_threads``
threads and ``max_text_chars`` characters of text, the least recently used
thread forgotten whole; at most ``max_runs_per_thread`` runs in a thread;
and operations that never yield to the scheduler (the hot path of a server
without a database).
"""

from __future__ import annotations

import json
import time

import pytest
import trio

from netra.errors import NotFound, StoreError
from netra.store import MemoryStore, RunOutcome, RunStart, ToolCallRecord

from ._backends import uid


def start_of(user: str, *, thread_id: str | None = None, client_id: str | None = None,
             text: str = "hello") -> RunStart:  # fmt: skip
    return RunStart(
        run_id=uid("run"), thread_id=thread_id, new_thread_id=uid("thread"), user_id=user,
        agent="echo", text=text, user_message_id=uid("msg"), client_id=client_id,
        started_at=time.time(),
    )  # fmt: skip


def done(start: RunStart, thread_id: str, *, answer: str = "answer", **changes: object) -> RunOutcome:
    return RunOutcome(**{
        "run_id": start.run_id, "thread_id": thread_id, "status": "completed", "ended_at": time.time(),
        "duration_ms": 1, "answer_message_id": uid("msg"), "answer_text": answer, "usage": {},
        **changes,
    })  # fmt: skip


async def counted_chars(store: MemoryStore) -> int:
    """The text the store holds, counted from what it gives back."""
    total = 0
    for user in list(store._by_user):
        for thread in await store.list_threads(user, limit=10**6):
            _, messages, runs = await store.get_thread(user, thread.id)
            total += sum(len(m.text) for m in messages)
            for run in runs:
                for c in run.tool_calls:
                    total += len(json.dumps(c.args)) + len(json.dumps(c.result)) + len(c.error or "")
    return total


async def opened(**kwargs: int) -> MemoryStore:
    store = MemoryStore(**kwargs)
    await store.open()
    return store


async def test_the_least_recently_used_thread_is_forgotten_whole() -> None:
    store = await opened(max_threads=3)
    firsts = [start_of(f"u{i}", client_id="hello") for i in range(3)]
    threads = [(await store.begin_run(s)).thread.id for s in firsts]
    # u0's thread is used again (a run on it): u1's becomes the oldest
    again = start_of("u0", thread_id=threads[0], client_id="second")
    await store.begin_run(again)
    await store.finish_run(done(again, threads[0]))

    fourth = start_of("u3")
    await store.begin_run(fourth)
    assert len(store) == 3
    with pytest.raises(NotFound):
        await store.get_thread("u1", threads[1])
    assert await store.list_threads("u1") == []
    assert await store.history(threads[1], limit=10) == []
    # its runs went with it ...
    with pytest.raises(NotFound):
        await store.finish_run(done(firsts[1], threads[1]))
    # ... and its client ids: the same message id is a new message now
    assert (await store.begin_run(start_of("u1", client_id="hello"))).duplicate_of is None
    # the threads used more recently are intact, ids included
    assert (await store.begin_run(start_of("u0", client_id="hello"))).duplicate_of == firsts[0].run_id
    _, messages, runs = await store.get_thread("u0", threads[0])
    assert len(runs) == 2 and len(messages) == 3


async def test_reading_a_thread_counts_as_using_it() -> None:
    store = await opened(max_threads=2)
    a = (await store.begin_run(start_of("ann"))).thread.id
    b = (await store.begin_run(start_of("bo"))).thread.id
    await store.get_thread("ann", a)  # now b is the least recently used
    await store.begin_run(start_of("cy"))
    await store.get_thread("ann", a)
    with pytest.raises(NotFound):
        await store.get_thread("bo", b)


async def test_memory_stays_bounded_over_a_soak() -> None:
    """20,000 runs by 500 users, each starting threads with message ids, with
    a bound of 100 threads: every index the store keeps stays within it."""
    store = await opened(max_threads=100)
    for i in range(20_000):
        user = f"user{i % 500}"
        s = start_of(user, client_id=f"m{i}")
        thread = (await store.begin_run(s)).thread.id
        await store.finish_run(done(s, thread))
        assert len(store) <= 100
    assert len(store._threads) == 100
    assert len(store._started) == 100  # one thread-start id per remembered thread
    assert sum(len(t) for t in store._by_user.values()) == 100
    assert len(store._by_user) <= 100  # users with no thread left are dropped


async def test_a_long_thread_keeps_its_latest_runs() -> None:
    store = await opened(max_runs_per_thread=8)
    first = start_of("ann", client_id="c0")
    thread = (await store.begin_run(first)).thread.id
    await store.finish_run(done(first, thread))
    starts = [first]
    for i in range(1, 40):
        s = start_of("ann", thread_id=thread, client_id=f"c{i}", text=f"q{i}")
        await store.begin_run(s)
        await store.finish_run(done(s, thread))
        starts.append(s)
        _, messages, runs = await store.get_thread("ann", thread)
        assert len(runs) <= 8 and len(messages) == 2 * len(runs)
    # the latest runs are whole, in order; the newest message is q39's answer
    assert [r.id for r in runs] == [s.run_id for s in starts[-len(runs):]]
    assert [m.text for m in await store.history(thread, limit=2)] == ["q39", "answer"]
    # the latest ids are remembered, forgotten ones are new messages again
    assert (await store.begin_run(start_of("ann", thread_id=thread, client_id="c39"))).duplicate_of == starts[-1].run_id
    assert (await store.begin_run(start_of("ann", thread_id=thread, client_id="c1"))).duplicate_of is None
    # the thread-starting message is forgotten: its id starts a new thread
    assert (await store.begin_run(start_of("ann", client_id="c0"))).duplicate_of is None


async def test_text_is_bounded_too() -> None:
    """Few threads, long texts: the text budget forgets the least recently
    used threads, and its count stays true through every way of forgetting."""
    store = await opened(max_text_chars=10_000, max_runs_per_thread=4)
    long = "x" * 1_000
    for i in range(30):
        user = f"user{i % 3}"
        s = start_of(user, text=long)
        thread = (await store.begin_run(s)).thread.id
        call = ToolCallRecord(id="t", run_id=s.run_id, name="n", args={"q": long}, result=[long], error="e")
        await store.finish_run(done(s, thread, answer=long, tool_calls=(call,)))
        assert store.text_chars <= 10_000
        assert store.text_chars == await counted_chars(store)
    assert 1 <= len(store) <= 10_000 // 4_000
    # a thread of its own beyond the budget is kept whole, bounded by its run count
    s = start_of("big", text=long * 20)
    thread = (await store.begin_run(s)).thread.id
    assert len(store) == 1 and store.text_chars == 20_000 == await counted_chars(store)
    for _ in range(6):
        again = start_of("big", thread_id=thread, text=long)
        await store.begin_run(again)
        await store.finish_run(done(again, thread, answer=long))
        assert store.text_chars == await counted_chars(store)
    assert len((await store.get_thread("big", thread))[2]) <= 4
    await store.delete_thread("big", thread)
    assert store.text_chars == 0 and len(store) == 0


async def test_operations_never_yield() -> None:
    """In an already cancelled scope every operation still completes: none of
    them reaches a checkpoint, so the hot path never waits on the scheduler."""
    store = await opened()
    with trio.CancelScope() as scope:
        scope.cancel()
        s = start_of("ann", client_id="c")
        thread = (await store.begin_run(s)).thread.id
        await store.history(thread, limit=5)
        await store.finish_run(done(s, thread))
        await store.list_threads("ann")
        await store.get_thread("ann", thread)
        await store.ping()
        await store.delete_thread("ann", thread)
    assert not scope.cancelled_caught


async def test_a_closed_store_refuses_and_forgets() -> None:
    store = await opened()
    s = start_of("ann")
    await store.begin_run(s)
    await store.aclose()
    assert len(store) == 0
    for call in (store.ping(), store.begin_run(start_of("ann")), store.list_threads("ann")):
        with pytest.raises(StoreError):
            await call
    with pytest.raises(ValueError):
        MemoryStore(max_threads=0)
