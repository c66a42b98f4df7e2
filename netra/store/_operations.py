"""The Store interface, once, for both SQL backends.

Every operation is a function of :mod:`netra.store._schema` run by the
backend's ``_call`` (a worker thread, one transaction, a borrowed
connection); ``write=True`` marks the ones that take SQLite's write lock up
front. The backends differ only in how they connect.
"""

from __future__ import annotations

from typing import Any

from . import _schema
from .base import PoolStats, RunOutcome, RunRecord, RunStart, RunStarted, StoredMessage, ThreadRecord


class SqlOperations:
    _gate: Any
    size: int

    async def _call(self, op: Any, *args: Any, write: bool = False) -> Any:  # pragma: no cover
        raise NotImplementedError

    async def ping(self) -> None:
        # a write transaction: ready means runs can be recorded (SQLite: the write lock is free)
        await self._call(_schema.ping, write=True)

    async def begin_run(self, start: RunStart) -> RunStarted:
        return await self._call(_schema.begin_run, start, write=True)

    async def finish_run(self, outcome: RunOutcome) -> None:
        await self._call(_schema.finish_run, outcome, write=True)

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

    def stats(self) -> PoolStats:
        if self._gate is None:
            return PoolStats(size=self.size, in_use=0, waiting=0, waits_total=0)
        return self._gate.stats()
