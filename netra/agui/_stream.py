"""One ``POST /agui`` request: the run it owns, and its event stream.

An :class:`AguiStream` is the body of the request's ``text/event-stream``
response, and for the run it is what a WebSocket session is: the
:class:`netra.runs.EventSink` of its own :class:`netra.runs.RunTable`, whose
runs live in a nursery this stream opens when quart starts sending the body
(``async with body``) and closes when the body ends. So the request owns
its run the way a connection does, on every way out:

- the run's terminal event is written: the body ends, the run's task is done;
- the client goes away (hypercorn reports ``http.disconnect`` and quart-trio
  cancels the request), or a write passes ``write_timeout_s`` (netra's
  deadline under hypercorn cuts the connection and cancels its tasks): the
  body is left with an exception, and the run is cancelled on the way out,
  with the reason ``disconnect``, recorded as cancelled, its capacity given
  back before the response's task ends;
- the server drains: the stream is one of ``hub.sessions``, so the drain
  waits for its run, then :meth:`close` cancels it (``shutdown``) and the
  stream ends with that run's terminal event.

A run starts under a shield (:class:`_ShieldedStarts`), so the request's
own cancellation never reaches it as an anonymous ``Cancelled``: it is
always ended through :meth:`netra.runs.Run.cancel`, with a reason, the way
a session's close ends its runs, and is counted as its user's own ending
rather than as a run affected from outside.

Sending never waits on the client (as for a session): events queue here,
consecutive ``text_delta`` merge while the client is behind, and each pass
of the body encodes everything queued into one write. A queue that reaches
``outbox_size`` while the client takes nothing is a slow consumer: its run
is cancelled at once, and the blocked write is cut at its deadline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs
import trio
from ag_ui.core import BaseEvent
from ag_ui.encoder import EventEncoder
from quart.wrappers.response import ResponseBody

from ..errors import InternalError, NetraError, RateLimited
from ..protocol import TERMINAL, Event, RunEvent, TextDelta, UserMessage
from ..runs import Run, RunTable
from ._events import RunEvents
from ._input import RunRequest

if TYPE_CHECKING:
    from ..auth import Identity
    from ..hub import Hub
    from ..limits import UserState

log = logging.getLogger("netra.agui")

#: An SSE comment: AG-UI clients skip it; it keeps proxies from timing out a
#: quiet stream and tells the server early when the client is gone.
KEEP_ALIVE = b": keep-alive\n\n"


def connection_refusal(hub: Hub, user: UserState | None) -> NetraError | None:
    """The connection limits of ``/ws``, for one more connection of ``user``."""
    c = hub.config
    attached = 0 if user is None else sum(not s.detached for s in user.connections)
    if len(hub.sessions) >= c.max_connections or attached >= c.max_connections_per_user:
        return RateLimited("too many connections", retry_after_ms=1000)
    return None


@attrs.define(eq=False, kw_only=True)
class AguiStream(ResponseBody):
    hub: Hub
    identity: Identity
    request: RunRequest
    #: The thread does not exist yet: the run creates it, with the client's id.
    new_thread: bool
    #: This request's runs (one): see netra.runs. Made when the body starts.
    runs: RunTable = attrs.field(init=False)
    run: Run | None = None
    #: Never waiting for a resume: counts as an attached connection of its user.
    detached: bool = False
    _events: RunEvents = attrs.field(init=False)
    _ready: list[BaseEvent] = attrs.field(factory=list)  # translated, not yet written
    _pending: list[Event] = attrs.field(factory=list)  # queued by the run, not yet translated
    _wake: trio.Event | None = None
    _cut: bool = False  # a slow consumer: nothing more is queued but the terminal event
    _writing_since: float | None = None  # a chunk is out with quart since then
    #: How the run is cancelled if the body ends before it does (close() sets these).
    _cancel_reason: str = "disconnect"
    _cause: str = "disconnect"
    _cancelled_by: str | None = None
    _serving: Any = None
    _encoder: EventEncoder = attrs.field(factory=EventEncoder)

    def __attrs_post_init__(self) -> None:
        self._events = RunEvents(thread_id=self.request.thread_id, run_id=self.request.run_id)

    # -- the body's lifetime: quart runs ``async with body: async for chunk in body`` --

    async def __aenter__(self) -> AguiStream:
        self._serving = self._serve()
        return await self._serving.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._serving.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _serve(self) -> AsyncIterator[AguiStream]:
        hub = self.hub
        user = hub.user(self.identity.user_id)
        refusal = connection_refusal(hub, user)  # again: others may have come since the request was checked
        self.runs = RunTable(hub, user, self)
        hub.sessions.add(self)
        user.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.runs.nursery = _ShieldedStarts(nursery)  # type: ignore[assignment]
                self._admit(refusal)
                try:
                    yield self
                finally:
                    self._abandon()
        finally:
            hub.sessions.discard(self)
            user.connections.discard(self)
            hub.forget_user_if_idle(user)

    def _admit(self, refusal: NetraError | None) -> None:
        req, ts = self.request, _now_ms()
        try:
            if refusal is not None:
                raise refusal
            self.run = self.runs.start(
                UserMessage(
                    text=req.text, thread_id=None if self.new_thread else req.thread_id,
                    agent=req.agent, id=req.message_id, multitask=req.multitask,
                ),
                new_thread_id=req.thread_id if self.new_thread else None,
            )
        except NetraError as exc:  # refused before it was admitted: no run, one RUN_ERROR
            log.info("agui run refused: %s", exc.message, extra={"user_id": self.identity.user_id, "code": exc.code})
            self._ready += self._events.refused(exc, ts=ts)
            return
        self._ready += self._events.started(self.run.id, self.run.agent.name, ts=ts)

    def _abandon(self) -> None:
        """The body is over: a run still going has lost its client. Left
        while a write had been waiting ``write_timeout_s``, the body was cut
        by the write deadline: a slow consumer, as on ``/ws``."""
        cause = self._cause
        since = self._writing_since
        if since is not None and trio.current_time() - since >= self.hub.config.write_timeout_s:
            cause = "slow_consumer"
        self.runs.cancel_all(self._cancel_reason, by=self._cancelled_by or self.identity.user_id, cause=cause)

    # -- the body's chunks -------------------------------------------------------

    def __aiter__(self) -> AguiStream:
        return self

    async def __anext__(self) -> bytes:
        self._writing_since = None  # quart asks for more: the last chunk is written
        interval = self.hub.config.heartbeat_interval_s
        while True:
            chunk = self._chunk()
            if chunk:
                self._writing_since = trio.current_time()
                return chunk
            if self._events.ended:  # a run cut as a slow consumer still ends with its terminal event
                raise StopAsyncIteration
            self._wake = trio.Event()
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await self._wake.wait()
                continue
            self._writing_since = trio.current_time()
            return KEEP_ALIVE

    def _chunk(self) -> bytes:
        """Everything queued, translated and encoded: one write."""
        ready, self._ready = self._ready, []
        events, self._pending = self._pending, []
        ts = _now_ms()
        own = self.run.id if self.run is not None else None
        try:
            for event in events:
                if isinstance(event, RunEvent) and event.run_id != own:
                    self.hub.metrics.isolation_violations.inc()
                    log.error("dropped an event of a run this request does not own")
                    continue
                ready += self._events.translate(event, ts=ts)
            return "".join(self._encoder.encode(e) for e in ready).encode()
        except Exception:  # a bug here must still end the stream the protocol's way
            log.exception("could not encode an AG-UI event", extra={"user_id": self.identity.user_id})
            self.runs.cancel_all("disconnect", by=self.identity.user_id, cause="internal")
            failed = self._events.refused(InternalError("internal error"), ts=ts)
            return "".join(self._encoder.encode(e) for e in failed).encode()

    # -- the run table's sink ----------------------------------------------------

    def send(self, event: Event) -> None:
        """Queue an event of this request's run; never blocks."""
        pending = self._pending
        if self._cut and event.type not in TERMINAL:
            return
        if type(event) is TextDelta and pending and type(last := pending[-1]) is TextDelta:
            pending[-1] = attrs.evolve(last, delta=last.delta + event.delta)  # type: ignore[union-attr]
        else:
            if len(pending) >= self.hub.config.outbox_size and not self._cut:
                self.hub.metrics.outbox_full.inc()
                self._slow_consumer()
                if event.type not in TERMINAL:
                    return
            pending.append(event)
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def _slow_consumer(self) -> None:
        log.info("slow consumer", extra={"user_id": self.identity.user_id})
        self._cut = True
        self._pending.clear()
        self.runs.cancel_all("disconnect", by=self.identity.user_id, cause="slow_consumer")

    # -- what the server's drain sees of every connection ---------------------------

    def close(
        self, code: int | None, reason: str = "", *, cause: str,
        cancel_reason: str = "disconnect", by: str | None = None,
    ) -> None:
        """End the request's run (``code`` and ``reason`` are a WebSocket's;
        the run's terminal event ends this stream)."""
        self._cancel_reason, self._cause, self._cancelled_by = cancel_reason, cause, by
        if self.run is not None:
            self.runs.cancel_all(cancel_reason, by=by or self.identity.user_id, cause=cause)

    def queued_events(self) -> int:
        return len(self._pending)


@attrs.frozen
class _ShieldedStarts:
    """The request's nursery as its run table starts runs in it: each run
    shielded from the request's own cancellation, which reaches it only as
    :meth:`netra.runs.Run.cancel` with a reason (see AguiStream._abandon).
    A run always ends: its own cancel scope and timeout are inside the
    shield, and the body cancels it on every way out."""

    nursery: trio.Nursery

    def start_soon(self, fn: Any, *args: Any, name: object = None) -> None:
        self.nursery.start_soon(_shielded, fn, *args, name=name)


async def _shielded(fn: Any, *args: Any) -> None:
    with trio.CancelScope(shield=True):
        await fn(*args)


def _now_ms() -> int:
    return int(time.time() * 1000)

