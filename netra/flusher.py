"""The flusher: hands every session's pending events to its transport, once
per scheduler pass.

Batching is what makes the hot path cheap: a run's events produced in one
pass of trio's scheduler leave in one ``send`` syscall, and one wake-up of
this task serves every connection that had something to send in that pass.
Flushing never blocks (a transport that is behind keeps a backlog under its
own write deadline), so one slow client cannot delay another's events.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("netra.session")


class Flusher:
    """A session that gets an event marks itself dirty here; the flusher
    task wakes in the next pass and flushes every dirty session in turn.
    Without a running flusher task, a session flushes at once."""

    __slots__ = ("_dirty", "_task", "_parked")

    def __init__(self) -> None:
        self._dirty: list[Session] = []
        self._task: Any = None
        self._parked = False

    def mark(self, session: Session) -> None:
        if self._task is None:
            session.flush()
            return
        self._dirty.append(session)
        if self._parked:
            self._parked = False
            trio.lowlevel.reschedule(self._task)

    async def run(self) -> None:
        self._task = trio.lowlevel.current_task()
        try:
            while True:
                if not self._dirty:
                    self._parked = True
                    await trio.lowlevel.wait_task_rescheduled(self._abort)
                dirty, self._dirty = self._dirty, []
                for session in dirty:
                    try:
                        session.flush()
                    except Exception:  # a bug in one session must not stop everyone's events
                        log.exception("flushing a connection failed; closing it")
                        session.transport.abort()
                # no checkpoint here: parking is one, and only other tasks can mark sessions dirty
        finally:
            self._task = None
            for session in self._dirty:
                session.flush()
            self._dirty.clear()

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._parked = False
        return trio.lowlevel.Abort.SUCCEEDED
