"""Approvals kept with their run, on every backend: the request while the
run waits, the decision over it, and what becomes of a request its run
never saw answered (finished, or lost with its node)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from netra.errors import NotFound
from netra.store import ApprovalRecord, RunStart, Store

from ._backends import Backend, uid
from .test_store import ALL_BACKENDS, IO_TIMEOUT, backend_named, count, opened, outcome_of, start_of


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return backend_named(request, request.param, tmp_path)


def pending(start: RunStart, thread_id: str, call: str = "call_1", **changes) -> ApprovalRecord:
    values = dict(
        run_id=start.run_id, thread_id=thread_id, tool_call_id=call, tool="transfer",
        args={"amount": 5, "to": "bo"}, status="pending", requested_at=start.started_at + 0.1,
        expires_at=start.started_at + 300.1,
    )
    return ApprovalRecord(**(values | changes))


async def approvals_of(store: Store, user: str, thread_id: str) -> tuple[ApprovalRecord, ...]:
    [run] = (await store.get_thread(user, thread_id))[2]
    return run.approvals


async def test_an_approval_and_its_decision_are_kept_with_the_run(any_backend: Backend) -> None:
    user = uid("user")
    async with opened(any_backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            start = start_of(user, at=1000.0)
            thread = (await store.begin_run(start)).thread.id
            first = pending(start, thread)
            await store.record_approval(first)
            assert await approvals_of(store, user, thread) == (first,)

            approved = attrs.evolve(first, status="approved", decided_at=1010.0, edited_args={"amount": 3, "to": "bo"})
            await store.record_approval(approved)
            late = attrs.evolve(first, status="denied", decided_at=1020.0, reason="too late")
            await store.record_approval(late)  # only a pending approval takes a decision
            second = pending(start, thread, "call_2", requested_at=1030.0, expires_at=1330.0, args={})
            await store.record_approval(second)
            denied = attrs.evolve(second, status="denied", decided_at=1040.0, reason="not now \x00")
            await store.record_approval(denied)
            third = pending(start, thread, "call_3", requested_at=1050.0, expires_at=1350.0)
            await store.record_approval(third)
            await store.finish_run(outcome_of(start, thread, ended_at=1060.0))

            got = await approvals_of(store, user, thread)
            assert got[:2] == (approved, attrs.evolve(denied, reason=got[1].reason))
            assert got[1].reason in ("not now \x00", "not now \ufffd")  # PostgreSQL refuses NUL
            # still pending when its run ended: it was never answered
            assert got[2] == attrs.evolve(third, status="cancelled", decided_at=1060.0)

            with pytest.raises(NotFound):
                await store.record_approval(pending(start_of(user), thread))
            await store.delete_thread(user, thread)
            with pytest.raises(NotFound):  # its run went with its thread
                await store.record_approval(attrs.evolve(first, tool_call_id="call_9"))


async def test_a_dead_nodes_pending_approvals_are_cancelled_with_its_runs(backend: Backend) -> None:
    user = uid("user")
    config = backend.config()
    with trio.fail_after(IO_TIMEOUT):
        async with opened(config) as alive:
            async with opened(config) as doomed:
                start = start_of(user)
                thread = (await doomed.begin_run(start)).thread.id
                await doomed.record_approval(pending(start, thread))
            assert await alive.close_orphaned_runs() == 1
            [approval] = await approvals_of(alive, user, thread)
            assert approval.status == "cancelled" and approval.decided_at is not None


async def test_deleting_a_thread_deletes_its_approvals(backend: Backend) -> None:
    user = uid("user")
    async with opened(backend.config()) as store:
        with trio.fail_after(IO_TIMEOUT):
            start = start_of(user)
            thread = (await store.begin_run(start)).thread.id
            await store.record_approval(pending(start, thread))
            assert await count(store, "approvals", "run_id = ?", start.run_id) == 1
            await store.delete_thread(user, thread)
            assert await count(store, "approvals", "run_id = ?", start.run_id) == 0
