"""The Store interface, once, for both SQL backends.

Every operation is a function of :mod:`netra.store._schema` run by the
backend's ``_call`` (a worker thread, one transaction, a borrowed
connection); ``write=True`` marks the ones that take SQLite's write lock up
front. ``begin_run`` and ``finish_run``, two per run (and
``record_approval``, two per approval), go through group commit instead
(:mod:`netra.store._batch`): many in one transaction. The backends differ
only in how they connect and how they hold their node's liveness lock
(:mod:`netra.store._nodes`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import trio

from ..errors import StoreError
from . import _schema
from ._batch import GroupCommit
from ._nodes import Claims, new_node_id
from .base import (
    ApprovalRecord,
    PoolStats,
    RunOutcome,
    RunRecord,
    RunStart,
    RunStarted,
    StoredMessage,
    ThreadRecord,
)

log = logging.getLogger("netra.store")


@attrs.define(eq=False, kw_only=True)
class SqlOperations:
    #: Recorded with every run this store begins (see netra.store._nodes).
    node_id: str = attrs.field(factory=new_node_id)
    #: Whether open() closes the runs dead nodes left running. A cluster
    #: whose membership decides who is dead may turn it off and call
    #: close_orphaned_runs(node_id) itself.
    recover_orphans: bool = True
    #: Most writes in one group-commit transaction.
    max_batch: int = 64
    _commits: GroupCommit | None = attrs.field(default=None, init=False)
    _claims: Claims | None = attrs.field(default=None, init=False)

    @property
    def size(self) -> int:  # pragma: no cover
        raise NotImplementedError

    async def _call(self, op: Any, *args: Any, write: bool = False) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _gate_or_none(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    # -- lifecycle helpers, for the backends' open() and aclose() ------------

    async def _start_node(self, claims: Claims | None) -> None:
        """Claim this node, then close what dead ones left running."""
        self._claims = claims
        if claims is None:
            return
        await trio.to_thread.run_sync(claims.claim, self.node_id)
        if self.recover_orphans and (closed := await self.close_orphaned_runs()):
            log.warning("closed %d runs left running by a netra process that is gone (node_lost)", closed)

    async def _stop_node(self) -> None:
        claims, self._claims, self._commits = self._claims, None, None
        if claims is not None:
            await trio.to_thread.run_sync(claims.close)

    # -- the interface ---------------------------------------------------------

    async def ping(self) -> None:
        # a write transaction: ready means runs can be recorded (SQLite: the write lock is free)
        await self._call(_schema.ping, write=True)

    async def begin_run(self, start: RunStart) -> RunStarted:
        return await self._group().submit(_schema.begin_run, start, self.node_id)

    async def finish_run(self, outcome: RunOutcome) -> None:
        await self._group().submit(_schema.finish_run, outcome)

    async def record_approval(self, approval: ApprovalRecord) -> None:
        # a write of a live run, like begin/finish: it joins their batches
        await self._group().submit(_schema.record_approval, approval)

    def _group(self) -> GroupCommit:
        if self._commits is None:
            raise StoreError("the store is not open")
        return self._commits

    async def history(self, thread_id: str, *, limit: int) -> list[StoredMessage]:
        if limit <= 0:  # PostgreSQL rejects a negative LIMIT
            return []
        return await self._call(_schema.history, thread_id, limit)

    async def list_threads(self, user_id: str, *, limit: int = 100) -> list[ThreadRecord]:
        if limit <= 0:
            return []
        return await self._call(_schema.list_threads, user_id, limit)

    async def get_thread(
        self, user_id: str, thread_id: str
    ) -> tuple[ThreadRecord, list[StoredMessage], list[RunRecord]]:
        return await self._call(_schema.get_thread, user_id, thread_id)

    async def delete_thread(self, user_id: str, thread_id: str) -> None:
        await self._call(_schema.delete_thread, user_id, thread_id, write=True)

    async def close_orphaned_runs(self, node_id: str | None = None) -> int:
        if node_id is not None:
            if node_id == self.node_id:
                raise ValueError("a store cannot close its own node's runs")
            return await self._call(_schema.close_runs_of, [node_id], time.time(), write=True)
        claims = self._claims
        if claims is None:  # read-only: it writes no runs and may close none
            return 0
        nodes = [n for n in await self._call(_schema.running_nodes) if n != self.node_id]
        if not nodes:
            return 0
        dead = await trio.to_thread.run_sync(claims.take_dead, nodes)
        try:
            if not dead:
                return 0
            return await self._call(_schema.close_runs_of, dead, time.time(), write=True)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(claims.let_go, dead)

    def stats(self) -> PoolStats:
        gate = self._gate_or_none()
        if gate is None:
            return PoolStats(size=self.size, in_use=0, waiting=0, waits_total=0)
        commits = self._commits
        if commits is None:
            return gate.stats()
        return attrs.evolve(gate.stats(), writes=commits.writes, write_batches=commits.batches)
