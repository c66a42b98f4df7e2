"""One ``POST /agui`` request's event stream: the body of its
``text/event-stream`` response.

An :class:`AguiStream` streams one run: a new one it asks the AG-UI run
table to admit, or the paused one its ``resume`` answers. It is the run's
subscriber (:mod:`netra.agui._run`): it takes the run's events, translates
them (:mod:`netra.agui._events`) and writes them, and on every way out it
settles what becomes of the run:

- the run's terminal event is written: the body ends;
- the run asks for approval of tool calls: the stream ends with the
  interrupt outcome, and the run is parked, waiting for its decisions, with
  its events for the request that resumes it;
- the client goes away (hypercorn reports ``http.disconnect`` and
  quart-trio cancels the request), or a write passes ``write_timeout_s``
  (netra's deadline under hypercorn cuts the connection and cancels its
  tasks), before either: the body is left with an exception, and the run is
  cancelled on the way out with the reason ``disconnect`` (its user's own
  ending, not a teardown from outside), recorded as cancelled, its capacity
  back before the response's task ends;
- the server drains: the drain waits for the run, then cancels it
  (``shutdown``) and the stream ends with that run's terminal event.

Sending never waits on the client (as for a session): events queue with
the run, consecutive ``text_delta`` (and thinking text) merge while the
client is behind, and each pass of the body encodes everything queued into
one write. A queue that reaches ``outbox_size`` while the client takes
nothing is a slow consumer: its run is cancelled at once, and the blocked
write is cut at its deadline.
"""

from __future__ import annotations

import logging
import math
import time
from types import TracebackType
from typing import TYPE_CHECKING

import attrs
import trio
from ag_ui.core import BaseEvent
from ag_ui.encoder import EventEncoder
from quart.wrappers.response import ResponseBody

from ..errors import InternalError, NetraError
from ..protocol import ApprovalRequired, RunEvent
from ..runs import Run, RunTable
from ._events import RunEvents
from ._input import RunRequest
from ._run import AguiRun

if TYPE_CHECKING:
    from ..auth import Identity
    from ..hub import Hub

log = logging.getLogger("netra.agui")

#: An SSE comment: AG-UI clients skip it; it keeps proxies from timing out a
#: quiet stream and tells the server early when the client is gone.
KEEP_ALIVE = b": keep-alive\n\n"
#: Before a stream ends at an interrupt, the calls of the same step that ask
#: too (each records its request in the store first) get this long of quiet,
#: at most ``_GATHER_MAX_S`` in all, to join the same interrupt outcome: one
#: answer for all of them rather than one round trip each.
_GATHER_QUIET_S = 0.01
_GATHER_MAX_S = 0.1


@attrs.define(eq=False, kw_only=True)
class AguiStream(ResponseBody):
    hub: Hub
    identity: Identity
    request: RunRequest
    #: The thread does not exist yet: the run creates it, with the client's id.
    new_thread: bool = False
    #: The request resumes the paused run its ``resume`` entries answer;
    #: else it starts a run (and any entries it has answer nothing waiting).
    resuming: bool = False
    #: The run this request streams; None when it was refused.
    owner: AguiRun | None = None
    _events: RunEvents = attrs.field(init=False)
    _ready: list[BaseEvent] = attrs.field(factory=list)  # translated, not yet written
    _wake: trio.Event | None = None
    _writing_since: float | None = None  # a chunk is out with quart since then
    _encoder: EventEncoder = attrs.field(factory=EventEncoder)

    def __attrs_post_init__(self) -> None:
        self._events = RunEvents(thread_id=self.request.thread_id, run_id=self.request.run_id)

    @property
    def run(self) -> Run | None:
        return self.owner.run if self.owner is not None else None

    @property
    def runs(self) -> RunTable | None:
        return self.owner.runs if self.owner is not None else None

    # -- the body's lifetime: quart runs ``async with body: async for chunk in body`` --

    async def __aenter__(self) -> AguiStream:
        req, ts, agui = self.request, _now_ms(), self.hub.agui
        try:
            if self.resuming:
                self.owner, ignored = agui.resume(self.identity, req, subscriber=self)
                assert self.owner.events is not None
                self._events = self.owner.events.continued(req.run_id)
                self._ready += self._events.resumed(ts=ts, ignored=ignored)
            else:
                self.owner = agui.open(self.identity, req, new_thread=self.new_thread, subscriber=self)
                assert self.owner.run is not None
                ignored = [a.interrupt_id for a in req.resume]  # nothing they name waits (see the endpoint)
                self._ready += self._events.started(
                    self.owner.run.id, self.owner.run.agent.name, ts=ts, ignored=ignored
                )
        except NetraError as exc:  # refused before it was admitted or resumed: no run, one RUN_ERROR
            log.info("agui run refused: %s", exc.message, extra={"user_id": self.identity.user_id, "code": exc.code})
            self._ready += self._events.refused(exc, ts=ts)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        """The body is over. A run that neither ended nor paused has lost its
        client: it is cancelled, and the request waits (bounded) for its end,
        so its capacity is back before the response's task ends. Left while
        a write had been waiting ``write_timeout_s``, the body was cut by the
        write deadline: a slow consumer, as on ``/ws``."""
        owner = self.owner
        if owner is None:
            return None
        if self._events.ended:
            owner.detach(self)
            return None
        c = self.hub.config
        cause = "disconnect"
        since = self._writing_since
        if since is not None and trio.current_time() - since >= c.write_timeout_s:
            cause = "slow_consumer"
        owner.detach(self, cancel=("disconnect", cause))
        with trio.CancelScope(shield=True), trio.move_on_after(c.close_timeout_s + c.store_timeout_s):
            await owner.ran.wait()
        return None

    # -- the body's chunks -------------------------------------------------------

    def __aiter__(self) -> AguiStream:
        return self

    async def __anext__(self) -> bytes:
        self._writing_since = None  # quart asks for more: the last chunk is written
        interval = self.hub.config.heartbeat_interval_s
        while True:
            if self.owner is not None and not self._events.ended and self.owner.asking():
                await self._gather(self.owner)
            chunk = self._chunk()
            if chunk:
                self._writing_since = trio.current_time()
                return chunk
            if self._events.ended:  # a run cut as a slow consumer still ends with its terminal event
                raise StopAsyncIteration
            owner = self.owner
            if owner is None or owner.ran.is_set():  # never: a run's task ends after its terminal event
                log.error("an AG-UI run ended without its terminal event", extra={"user_id": self.identity.user_id})
                self._ready += self._events.refused(InternalError("internal error"), ts=_now_ms())
                continue
            self._wake = trio.Event()
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await self._wake.wait()
                continue
            self._writing_since = trio.current_time()
            return KEEP_ALIVE

    @staticmethod
    async def _gather(owner: AguiRun) -> None:
        """Let the calls asking at the same time queue their requests too."""
        with trio.move_on_after(_GATHER_MAX_S):
            while True:
                queued = owner.queued_events()
                await trio.sleep(_GATHER_QUIET_S)
                if owner.queued_events() == queued:
                    return

    def wake(self) -> None:
        """The run queued events (the subscriber's side of netra.agui._run)."""
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def _chunk(self) -> bytes:
        """Everything queued, translated and encoded: one write."""
        ready, self._ready = self._ready, []
        ts = _now_ms()
        try:
            if self.owner is not None and not self._events.ended:
                ready += self._translate(self.owner, ts)
            return "".join(self._encoder.encode(e) for e in ready).encode()
        except Exception:  # a bug here must still end the stream the protocol's way
            log.exception("could not encode an AG-UI event", extra={"user_id": self.identity.user_id})
            if self.owner is not None:
                self.owner.cancel("disconnect", cause="internal")
            failed = self._events.refused(InternalError("internal error"), ts=ts)
            return "".join(self._encoder.encode(e) for e in failed).encode()

    def _translate(self, owner: AguiRun, ts: int) -> list[BaseEvent]:
        """The run's queued events, up to an interrupt: calls that still
        wait for approval end the stream, all of those queued in one
        interrupt outcome, and the events after them stay with the run."""
        events = owner.take()
        own = owner.run.id if owner.run is not None else None
        out: list[BaseEvent] = []
        for i, event in enumerate(events):
            if isinstance(event, RunEvent) and event.run_id != own:
                self.hub.metrics.isolation_violations.inc()
                log.error("dropped an event of a run this request does not own")
                continue
            if type(event) is ApprovalRequired:
                later = events[i + 1 :]
                asks = owner.still_asked([event, *(e for e in later if type(e) is ApprovalRequired)])
                if not asks:  # decided already: its tool_executing follows
                    continue
                out += self._events.interrupt(asks, ts=ts, tool_of=owner.tool_named)
                taken = {id(a) for a in asks}
                owner.park(self, self._events, asks, [e for e in later if id(e) not in taken])
                return out
            out += self._events.translate(event, ts=ts)
        return out


def _now_ms() -> int:
    return int(time.time() * 1000)
