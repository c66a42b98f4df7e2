"""One WebSocket connection, owned by one nursery.

The nursery owns the connection's receive loop, its single writer (the only
task that writes to the socket), its timers and every run started on it. So a
disconnect cancels exactly this connection's work, and a failure inside it
can reach nothing else.

Outgoing events pass through one bounded channel. A producer that finds it
full waits at most ``slow_consumer_timeout_s``; past that the client is a slow
consumer: its runs are cancelled and the connection closes 4430. Closing
always follows the same path: cancel the runs, let the writer flush what is
queued and send the close frame, and if that does not finish within
``close_timeout_s`` (a peer that stopped reading leaves hypercorn's shielded
send blocked) cut the socket, which frees every task and buffer of the
connection.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import errors
from .agents import route
from .auth import Identity
from .errors import Busy, NetraError, NotFound, RunInProgress
from .limits import TokenBucket, all_available
from .protocol import (
    TERMINAL,
    AgentThinking,
    Auth,
    Cancel,
    Connected,
    Error,
    Event,
    Ping,
    Pong,
    RunEvent,
    UserMessage,
    encode_event,
    error_event,
    parse_client_message,
)
from .runs import REQUESTED_ENDINGS, SERVER, Run, execute, new_id
from .web.ws import WebSocket

if TYPE_CHECKING:
    from .hub import Hub
    from .limits import UserState
    from .store.base import ToolCallRecord

log = logging.getLogger("netra.session")

#: Most events the writer sends in one transport write.
_MAX_BATCH = 64


@attrs.define(eq=False)
class Session:
    hub: Hub
    ws: WebSocket
    identity: Identity
    user: UserState
    connection_id: str = attrs.field(factory=lambda: f"conn_{uuid.uuid4().hex[:20]}")
    runs: dict[str, Run] = attrs.field(factory=dict)
    #: Runs whose events this connection may carry: the isolation check of the writer.
    _owned: set[str] = attrs.field(factory=set)
    run_limiter: trio.CapacityLimiter = attrs.field(init=False)
    bucket: TokenBucket = attrs.field(init=False)
    seq: int = 0
    bad_frames: int = 0
    #: When the writer's current socket write began (None: not writing).
    send_since: float | None = None
    close_code: int | None = None
    closing: bool = False
    _send: trio.MemorySendChannel[Event] = attrs.field(init=False)
    _recv: trio.MemoryReceiveChannel[Event] = attrs.field(init=False)
    _nursery: trio.Nursery | None = None
    _writer_done: trio.Event = attrs.field(factory=trio.Event)
    _runs_idle: trio.Event = attrs.field(factory=trio.Event)
    _expiry_changed: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        c = self.hub.config
        self.run_limiter = trio.CapacityLimiter(c.max_runs_per_connection)
        self.bucket = TokenBucket(c.rate_per_s, c.rate_burst)
        self._send, self._recv = trio.open_memory_channel(c.outbox_size)
        self._runs_idle.set()

    # -- lifecycle --------------------------------------------------------------

    async def serve(self) -> None:
        hub, m = self.hub, self.hub.metrics
        hub.sessions.add(self)
        self.user.connections.add(self)
        m.connections_opened.inc()
        m.connections_open.inc()
        ids = {"connection_id": self.connection_id, "user_id": self.identity.user_id}
        log.info("connection opened", extra=ids)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reaper)
                nursery.start_soon(self._expiry_watch)
                await self.put(Connected(
                    connection_id=self.connection_id,
                    user_id=self.identity.user_id,
                    limits=hub.limits_advertised(),
                    server_version=hub.version,
                ))
                await self._receive_loop()
        finally:
            hub.sessions.discard(self)
            self.user.connections.discard(self)
            hub.forget_user_if_idle(self.user)
            m.connections_open.dec()
            # hypercorn reports any close by the peer as 1006, whatever its code
            code = str(self.close_code) if self.close_code is not None else "client"
            m.connections_closed.labels(code).inc()
            log.info("connection closed", extra={**ids, "code": code})

    def close(
        self, code: int | None, reason: str = "", *, cause: str,
        cancel_reason: str = "disconnect", by: str | None = None,
    ) -> None:
        """Start closing: runs are cancelled with ``cancel_reason`` (the wire
        reason) because of ``cause``, on behalf of ``by`` (default: this
        connection's user); ``code`` None means the peer is already gone."""
        if self.closing or self._nursery is None:
            return
        self.closing = True
        self.close_code = code
        if code is None:
            self.ws.closed = True  # nothing more can be sent
        for run in list(self.runs.values()):
            run.cancel(cancel_reason, by=by or self.identity.user_id, cause=cause)
        self._nursery.start_soon(self._close_sequence, code, reason)

    async def _close_sequence(self, code: int | None, reason: str) -> None:
        with trio.move_on_after(self.hub.config.close_timeout_s) as waited:
            await self._runs_idle.wait()
            self._send.close()  # the writer sends what is queued, then stops
            await self._writer_done.wait()
            if code is not None:
                await self.ws.close(code, reason)
        if waited.cancelled_caught:
            self.hub.metrics.transport_aborts.inc()
            self.ws.abort()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _reaper(self) -> None:
        """If the nursery is cancelled from outside while the writer is stuck
        in hypercorn's shielded send, cut the socket so the nursery can exit."""
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.hub.config.close_timeout_s):
                    await self._writer_done.wait()
                if not self._writer_done.is_set():
                    self.ws.abort()

    async def _expiry_watch(self) -> None:
        grace = self.hub.config.token_expiry_grace_s
        while True:
            left = self.identity.expires_at + grace - time.time()
            with trio.move_on_after(max(0.0, left)) as waited:
                await self._expiry_changed.wait()
            if not waited.cancelled_caught:  # refreshed: watch the new expiry
                self._expiry_changed = trio.Event()
                continue
            self.close(errors.CLOSE_UNAUTHORIZED, "token expired", cause="token_expired")
            return

    # -- outgoing -----------------------------------------------------------------

    async def put(self, event: Event) -> None:
        """Queue an event for the writer. Never blocks longer than the
        slow-consumer timeout; after a close, events are dropped."""
        if self.ws.closed and self.close_code is None:
            return
        try:
            self._send.send_nowait(event)
            return
        except trio.WouldBlock:
            self.hub.metrics.outbox_full.inc()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        with trio.move_on_after(self.hub.config.slow_consumer_timeout_s):
            try:
                await self._send.send(event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            return
        self.slow_consumer()

    def slow_consumer(self) -> None:
        """The client does not read its events: close 4430 (the socket is cut
        if even the close frame cannot be delivered). A client that stops
        reading while its messages are being refused for rate is flooding:
        its replies pile up because of its own rate, so it gets 4429."""
        if self.closing:
            return
        ids = {"connection_id": self.connection_id, "user_id": self.identity.user_id}
        if self.bucket.abuse_now() >= 1.0:
            log.info("flooding and not reading", extra=ids)
            self._close_flooding()
            return
        log.info("slow consumer", extra=ids)
        self.hub.metrics.slow_consumer_closes.inc()
        self.close(errors.CLOSE_SLOW_CONSUMER, "slow consumer", cause="slow_consumer")

    def _close_flooding(self) -> None:
        self.close(errors.CLOSE_TOO_MANY, "message rate exceeded", cause="rate_limited")

    async def emit(self, run: Run, event: RunEvent) -> None:
        """Queue an event of ``run``, keeping the run's event rules: nothing
        after the terminal event, and agent_started before anything else."""
        if run.finished:
            return
        if not run.announced:
            run.announced = True
            self.hub.metrics.time_to_first_event.observe(trio.current_time() - run.received_at)
        if event.type in TERMINAL:
            # every run has the same shape, even one that ended before its
            # model said anything (or before it left the queue)
            if not run.started:
                await self.emit(run, _started_for(run))
            if not run.thought:
                await self.emit(run, AgentThinking(
                    run_id=run.id, thread_id=run.thread_id, agent=run.agent.name, text="", step=1
                ))
            run.terminal = event.type
        elif event.type == "agent_started":
            run.started = True
        elif event.type == "agent_thinking":
            run.thought = True
        await self.put(event)

    async def _writer(self) -> None:
        """The only task that writes to the socket."""
        try:
            async for event in self._recv:
                batch = [event]  # whatever else is already queued goes in the same write
                while len(batch) < _MAX_BATCH:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                ts = int(time.time() * 1000)
                texts = []
                for item in batch:
                    if isinstance(item, RunEvent):
                        if item.run_id not in self._owned:
                            self.hub.metrics.isolation_violations.inc()
                            log.error("dropped an event of a run this connection does not own")
                            continue
                        if item.type in TERMINAL:
                            self._owned.discard(item.run_id)
                    self.seq += 1
                    texts.append(encode_event(item, seq=self.seq, ts=ts))
                if texts:
                    self.send_since = trio.current_time()  # watched by the slow-consumer sweep
                    await self.ws.send_texts(texts)
                    self.send_since = None
        finally:
            self._writer_done.set()

    # -- incoming -----------------------------------------------------------------

    async def _receive_loop(self) -> None:
        c = self.hub.config
        while not self.closing:
            frame = await self.ws.receive()
            if frame is None:
                self.close(None, cause="disconnect")
                return
            if self.closing:
                return
            try:
                message = parse_client_message(frame, max_bytes=c.max_message_bytes, max_text_chars=c.max_text_chars)
            except NetraError as exc:
                self.bad_frames += 1
                self.hub.metrics.bad_frames.labels(exc.code).inc()
                if self.bad_frames > c.max_bad_frames:
                    self.close(errors.CLOSE_PROTOCOL_ABUSE, "too many bad frames", cause="protocol_abuse")
                    return
                await self.put(error_event(exc))
                continue
            if not self.bucket.take():
                self.hub.metrics.bad_frames.labels("rate_limited").inc()
                if self.bucket.abuse >= c.rate_abuse_limit:
                    self._close_flooding()
                    return
                await self.put(Error(
                    code="rate_limited", message="too many messages; slow down",
                    ref=getattr(message, "id", None), retry_after_ms=self.bucket.retry_after_ms(),
                ))
                continue
            try:
                await self._dispatch(message)
            except NetraError as exc:
                await self.put(error_event(exc, ref=getattr(message, "id", None)))

    async def _dispatch(self, message: Any) -> None:
        match message:
            case Ping(id=ping_id):
                await self.put(Pong(id=ping_id))
            case UserMessage():
                self._start_run(message)
            case Cancel():
                await self._cancel(message)
            case Auth(token=token):
                identity = self.hub.verifier.verify(token)  # Unauthorized -> error event
                if identity.user_id != self.identity.user_id:
                    raise errors.Forbidden("a token for another user cannot be used on this connection")
                self.identity = identity
                self._expiry_changed.set()

    def _start_run(self, msg: UserMessage) -> None:
        hub, c, user = self.hub, self.hub.config, self.user
        if hub.draining:
            raise Busy("the server is shutting down", retry_after_ms=int(c.drain_grace_s * 1000))
        agent = route(hub.agents, msg.text, msg.agent)
        new_thread = msg.thread_id is None
        thread_id = msg.thread_id or new_id("thr")
        key = (user.user_id, msg.thread_id or "", msg.id)
        # with a store, the store decides duplicates (across processes and
        # restarts); without one, the hub remembers recent ids
        if hub.store is None and msg.id is not None and (original := hub.accepted_ids.get(key)) is not None:
            run_id, original_thread = original
            raise errors.BadRequest(
                f"message id {msg.id!r} was already accepted on this thread",
                run_id=run_id, thread_id=original_thread,
            )
        if hub.store is None and not new_thread:
            owner = hub.thread_owners.get(thread_id)
            if owner is not None and owner != user.user_id:
                raise NotFound(f"no thread {thread_id!r}")
        thread = user.thread(thread_id)
        multitask = msg.multitask or c.default_multitask
        if thread.busy:
            if multitask == "reject":
                active = thread.active or thread.waiting[0]
                raise RunInProgress("this thread has a run in progress", run_id=active.id, thread_id=thread_id)
            if multitask == "interrupt":
                for other in [thread.active, *thread.waiting]:
                    if other is not None:
                        other.cancel("interrupted", by=user.user_id)
        limiters = [self.run_limiter, user.run_limiter, hub.run_limiter]
        if thread.busy or not all_available(limiters):
            if user.pending >= c.max_queued_runs_per_user or hub.queued_runs >= c.max_queued_runs:
                user.release_thread(thread_id)
                raise Busy("capacity is full; try again shortly", retry_after_ms=1000)
        run = Run(
            id=new_id("run"), thread_id=thread_id, new_thread=new_thread, user_id=user.user_id,
            agent=agent, text=msg.text, client_id=msg.id, requested_agent=msg.agent,
        )
        if hub.store is None and msg.id is not None:
            hub.accepted_ids[key] = (run.id, thread_id)
            run.id_key = key
        if hub.store is None:
            hub.thread_owners[thread_id] = user.user_id
        self.runs[run.id] = run
        self._owned.add(run.id)
        self._runs_idle = trio.Event()
        user.runs.add(run)
        thread.waiting.append(run)
        user.pending += 1
        hub.queued_runs += 1
        hub.metrics.runs_queued.inc()
        assert self._nursery is not None
        self._nursery.start_soon(execute, self, run)

    async def _cancel(self, msg: Cancel) -> None:
        # only this connection's runs: their agent_cancelled is the answer, and
        # it goes to the connection that started them
        if msg.run_id is not None:
            targets = [r for r in (self.runs.get(msg.run_id),) if r is not None]
        else:
            targets = [r for r in self.runs.values() if r.thread_id == msg.thread_id]
        if not targets:
            raise NotFound("no such run in progress")
        for run in targets:
            run.cancel("client", by=self.identity.user_id)
        # the answer is each run's agent_cancelled

    # -- run bookkeeping (called by runs.execute) ---------------------------------

    def _count_containment(self, run: Run, outcome: str) -> None:
        """Failure containment: every run that did not complete is charged to
        its own user (``runs_failed``) or, when the cause came from outside
        that user and the operator, counted as affected (must stay 0)."""
        m = self.hub.metrics
        if outcome == "failed":
            m.runs_failed.labels(run.cause or "internal_error").inc()
        elif outcome == "cancelled":
            if run.cancel_reason is None:  # torn down from outside, no one asked
                m.runs_affected.labels("unrequested").inc()
            elif run.cancelled_by not in (run.user_id, SERVER):
                m.runs_affected.labels("other_user").inc()
            elif run.cause not in REQUESTED_ENDINGS:
                m.runs_failed.labels(run.cause or "disconnect").inc()

    def unqueue(self, run: Run) -> None:
        if run.pending:
            run.pending = False
            self.user.pending -= 1
            self.hub.queued_runs -= 1
            self.hub.metrics.runs_queued.dec()

    def run_ended(self, run: Run, exec_started: float | None) -> None:
        m = self.hub.metrics
        self.unqueue(run)
        if run.executing:
            m.runs_active.dec()
            if exec_started is not None:
                m.run_duration.observe(trio.current_time() - exec_started)
        outcome = {"agent_completed": "completed", "agent_error": "failed"}.get(run.terminal or "", "cancelled")
        if run.terminal is None and run.cancel_reason is None and not run.announced:
            outcome = "refused"
            if run.id_key is not None and self.hub.accepted_ids.get(run.id_key) == (run.id, run.thread_id):
                self.hub.accepted_ids.pop(run.id_key)  # refused: the same id may be retried
        m.runs_finished.labels(outcome, run.cause or "").inc()
        self._count_containment(run, outcome)
        thread = self.user.threads.get(run.thread_id)
        if thread is not None:
            if thread.active is run:
                thread.active = None
            if run in thread.waiting:
                thread.waiting.remove(run)
        self.user.runs.discard(run)
        self.user.release_thread(run.thread_id)
        self.runs.pop(run.id, None)
        if run.terminal is None:
            self._owned.discard(run.id)
        if not self.runs:
            self._runs_idle.set()
        self.hub.forget_user_if_idle(self.user)

    def count_tool_call(self, record: ToolCallRecord, outcome: str) -> None:
        m = self.hub.metrics
        m.tool_calls.labels(record.name, outcome).inc()
        m.tool_duration.labels(record.name).observe(record.duration_ms / 1000)

    def count_model_turn(self, outcome: str, first: float | None, total: float) -> None:
        m = self.hub.metrics
        m.model_turn.labels(outcome).observe(total)
        if first is not None:
            m.model_first_event.observe(first)

    def queued_events(self) -> int:
        return self._send.statistics().current_buffer_used

    def limiter_name(self, limiter: trio.CapacityLimiter) -> str:
        if limiter is self.run_limiter:
            return "connection"
        if limiter is self.user.run_limiter:
            return "user"
        return "global"


def _started_for(run: Run) -> RunEvent:
    from .protocol import AgentStarted

    return AgentStarted(
        run_id=run.id, thread_id=run.thread_id, agent=run.agent.name, message_id=run.message_id, ref=run.client_id
    )
