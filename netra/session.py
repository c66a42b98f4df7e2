"""One client connection, owned by one nursery: the socket side of a session.

The nursery owns the connection's receive loop, its transport's drain task
and every run started on it. So a disconnect cancels exactly this
connection's work, and a failure inside it can reach nothing else.

Sending never waits on the client. An event is appended to the session's
pending list and the session is marked dirty; the hub's :class:`Flusher`
wakes once per scheduler pass and hands every dirty session's pending
events to its transport in one write (one ``send`` syscall for everything a
pass produced). A transport that cannot take a write keeps the rest in its
backlog under a write deadline (see :mod:`netra.transport.base`); while it
is behind, events wait here and consecutive ``text_delta`` events of one run
merge into one, so a slow network does not multiply frames. A backlog that
does not drain within ``write_timeout_s`` makes this a slow consumer: its
runs are cancelled and the connection closes 4430, or is cut when even the
close frame cannot be delivered within ``close_timeout_s``.
"""

from __future__ import annotations

import collections
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import errors
from .approvals import route_decision
from .auth import Identity
from .errors import NetraError
from .limits import TokenBucket
from .protocol import (
    TERMINAL,
    Resume,
    Resumed,
    ResyncRequired,
    Auth,
    Cancel,
    Connected,
    Error,
    Event,
    Ping,
    Pong,
    RunEvent,
    TextDelta,
    ToolDecision,
    UserMessage,
    encode_event,
    error_event,
    parse_client_message,
)
from .cluster import link
from .runs import Ids, RunTable
from .transport import Transport
from .transport.frames import CLOSE_ABNORMAL

if TYPE_CHECKING:
    from .hub import Hub
    from .limits import UserState

log = logging.getLogger("netra.session")


@attrs.define(eq=False)
class Session:
    hub: Hub
    transport: Transport
    identity: Identity
    user: UserState
    connection_id: str = attrs.field(init=False)
    #: This session's runs (admission, cancel, ending): see netra.runs.
    runs: RunTable = attrs.field(init=False)
    bucket: TokenBucket = attrs.field(init=False)
    seq: int = 0
    bad_frames: int = 0
    close_code: int | None = None
    closing: bool = False
    #: Events not yet handed to the transport.
    _pending: list[Event] = attrs.field(factory=list)
    _dirty: bool = False
    #: While the transport is behind: run id -> index of its last pending text_delta.
    _merge: dict[str, int] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    _received_all: trio.Event = attrs.field(factory=trio.Event)
    _expires_at: float = math.inf  # trio time at which the token's grace ends
    _expiry: trio.CancelScope | None = None  # the reading, under the token's deadline
    #: Resumable sessions (resume_window_s > 0): its id and secret, the sent
    #: events it keeps for a replay, and its state while no connection carries it.
    session_id: str = attrs.field(init=False)
    resume_token: str | None = None
    #: Sent events kept for a resume, one entry per flush: (seq of its
    #: first event, the payloads, their size); a flush costs one append.
    _retained: collections.deque[tuple[int, list[bytes], int]] | None = None
    _retained_bytes: int = 0
    _retained_after: int = 0  # every event after this seq is retained
    detached: bool = False
    _incoming: tuple[Transport, int, trio.Event] | None = None  # a resume waiting to attach
    _attached: trio.Event | None = None
    _released: trio.Event | None = None  # set when this session stops using its transport
    #: The session this connection handed its transport to (a resume), and
    #: what tells this connection when that session is done with it.
    handed_to: Session | None = None
    handed_released: trio.Event | None = None
    #: In a cluster: the link (id, and the owner's answer's entry id) over
    #: which this connection carries a session resumed on another node.
    handed_link: tuple[str, link.Inbox] | None = None
    #: Gives back this connection's place among its user's connections
    #: across a cluster (None outside one): when the session ends, or when
    #: its connection drops and it waits for a resume.
    seat: Callable[[], None] | None = None
    #: Decisions on their way to another node of a cluster, and what the
    #: pongs of pings sent after them wait for (see _pong).
    _routing: int = 0
    _routed: trio.Event | None = None

    def __attrs_post_init__(self) -> None:
        c = self.hub.config
        self.connection_id = self.hub.ids.new("conn")
        self.session_id = self.hub.ids.new("ses")
        if c.resume_window_s > 0:
            self.resume_token = secrets.token_urlsafe(24)
        self.runs = RunTable(self.hub, self.user, self)
        self.bucket = TokenBucket(c.rate_per_s, c.rate_burst)
        self.transport.on_stalled = self.slow_consumer
        self.transport.on_drained = self._drained
        self._watch_expiry()

    # -- lifecycle --------------------------------------------------------------

    async def serve(self) -> None:
        hub, m = self.hub, self.hub.metrics
        hub.sessions.add(self)
        self.user.connections.add(self)
        if self.resume_token is not None:
            hub.resumable[self.session_id] = self
        m.connections_opened.inc()
        m.connections_open.inc()
        ids = {"connection_id": self.connection_id, "user_id": self.identity.user_id}
        log.info("connection opened", extra=ids)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.runs.nursery = nursery
                self.transport.start(nursery)
                self.send(Connected(
                    connection_id=self.connection_id,
                    user_id=self.identity.user_id,
                    limits=hub.limits_advertised(),
                    server_version=hub.version,
                    session_id=self.session_id,
                    resume_token=self.resume_token,
                ))
                await self._receive_loop()
        finally:
            if hub.resumable.get(self.session_id) is self:
                del hub.resumable[self.session_id]
            if self._released is not None:
                self._released.set()
            hub.sessions.discard(self)
            self.user.connections.discard(self)
            hub.forget_user_if_idle(self.user)
            m.connections_open.dec()
            t = self.transport
            code = next((c for c in (self.close_code, t.local_close_code, t.peer_close_code) if c is not None), None)
            label = "resumed" if self.handed_off else str(code) if code is not None else "unknown"
            m.connections_closed.labels(label).inc()
            log.info("connection closed", extra={**ids, "code": label, "lost": self.transport.lost})

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
        self.runs.cancel_all(cancel_reason, by=by or self.identity.user_id, cause=cause)
        self._nursery.start_soon(self._close_sequence, code, reason)

    async def _close_sequence(self, code: int | None, reason: str) -> None:
        """Runs end (their terminal events queued), everything pending goes
        out, then the close frame; the peer has ``close_timeout_s`` in all to
        answer it, after which the connection is cut."""
        transport = self.transport
        with trio.move_on_after(self.hub.config.close_timeout_s) as waited:
            await self.runs.wait_idle()
            self.flush()
            if code is not None:
                transport.send_close(code, reason)
            await self._received_all.wait()
        if waited.cancelled_caught:
            self.hub.metrics.transport_aborts.inc()
            transport.abort()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def _watch_expiry(self) -> None:
        grace = self.hub.config.token_expiry_grace_s
        left = self.identity.expires_at + grace - time.time()
        self._expires_at = trio.current_time() + max(0.0, left)
        if self._expiry is not None:
            self._expiry.deadline = self._expires_at

    # -- outgoing -----------------------------------------------------------------

    def send(self, event: Event) -> None:
        """Queue an event for the client. Never blocks; after a close, or
        once the transport can send nothing more (and no resume can come),
        events are dropped."""
        if self.transport.send_closed and (self.closing or self.resume_token is None):
            return
        pending = self._pending
        if self.transport.backlogged and not self.detached:
            if self._coalesce(event):
                return
            if len(pending) >= self.hub.config.outbox_size:
                self.hub.metrics.outbox_full.inc()
                self.slow_consumer()
                return
        pending.append(event)
        if not self._dirty:
            self._dirty = True
            self.hub.flusher.mark(self)

    def _coalesce(self, event: Event) -> bool:
        """While behind: a text_delta joins its run's last pending one when no
        other event of that run came between. True when it was merged."""
        merge = self._merge
        run_id = getattr(event, "run_id", None)
        if run_id is None:
            return False
        if type(event) is not TextDelta:
            merge.pop(run_id, None)
            return False
        at = merge.get(run_id)
        if at is None:
            merge[run_id] = len(self._pending)
            return False
        previous = self._pending[at]
        self._pending[at] = attrs.evolve(previous, delta=previous.delta + event.delta)  # type: ignore[union-attr]
        self.hub.metrics.deltas_merged.inc()
        return True

    def _drained(self) -> None:
        if self._pending and not self._dirty:
            self._dirty = True
            self.hub.flusher.mark(self)

    def flush(self) -> None:
        """Encode what is pending and hand it to the transport in one write."""
        self._dirty = False
        if not self._pending or (self.transport.backlogged and not self.detached):
            return
        events, self._pending = self._pending, []
        self._merge.clear()
        ts = int(time.time() * 1000)
        owned = self.runs.owned
        seq = self.seq
        payloads = []
        for item in events:
            run_id = getattr(item, "run_id", None)
            if run_id is not None and isinstance(item, RunEvent):
                if run_id not in owned:
                    self.hub.metrics.isolation_violations.inc()
                    log.error("dropped an event of a run this connection does not own")
                    continue
                if item.type in TERMINAL:
                    owned.discard(run_id)
            seq += 1
            payloads.append(encode_event(item, seq=seq, ts=ts))
        self.seq = seq
        if payloads:
            if self.resume_token is not None:
                self._retain(seq - len(payloads) + 1, payloads)
            if not self.detached:
                self.transport.send(payloads)

    def _retain(self, first_seq: int, payloads: list[bytes]) -> None:
        """Keep sent events for a resume, at most resume_buffer_bytes of them."""
        retained = self._retained
        if retained is None:
            retained = self._retained = collections.deque()
        size = sum(map(len, payloads))
        retained.append((first_seq, payloads, size))
        self._retained_bytes += size
        limit = self.hub.config.resume_buffer_bytes
        while self._retained_bytes > limit and retained:
            dropped_first, dropped, dropped_size = retained.popleft()
            self._retained_bytes -= dropped_size
            self._retained_after = dropped_first + len(dropped) - 1

    def slow_consumer(self) -> None:
        """The client does not read its events: close 4430 (the socket is cut
        if even the close frame cannot be delivered). A client that stops
        reading while its messages are being refused for rate is flooding:
        its replies pile up because of its own rate, so it gets 4429."""
        if self.closing:
            return
        ids = {"connection_id": self.connection_id, "user_id": self.identity.user_id}
        if self.bucket.refusals > 0:
            log.info("flooding and not reading", extra=ids)
            self._close_flooding()
            return
        log.info("slow consumer", extra=ids)
        self.hub.metrics.slow_consumer_closes.inc()
        self.close(errors.CLOSE_SLOW_CONSUMER, "slow consumer", cause="slow_consumer")

    def _close_flooding(self) -> None:
        self.close(errors.CLOSE_TOO_MANY, "message rate exceeded", cause="rate_limited")

    # -- incoming -----------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Read client messages until the peer closes or is gone. After this
        side starts closing, frames are read and dropped until the peer's
        close frame (the close handshake), so its socket never fills up. The
        token's expiry is the deadline of one scope around the reading,
        moved by a refresh. A connection that drops without a close frame
        leaves a resumable session waiting ``resume_window_s`` for a resume,
        its runs going on; a resume hands it a new transport and reading
        goes on there."""
        while True:
            transport = self.transport
            try:
                with trio.CancelScope(deadline=self._expires_at) as self._expiry:
                    await self._read_messages()
                if self._expiry.cancelled_caught:
                    self.close(errors.CLOSE_UNAUTHORIZED, "token expired", cause="token_expired")
                if self.closing:
                    while await transport.receive() is not None:
                        pass
            finally:
                self._received_all.set()
            if self.handed_off or self.closing or not await self._await_resume(transport):
                break
        if not self.closing and not self.handed_off:  # the peer closed, or went away
            self.close(None, cause="disconnect")
        if self.handed_off:
            return  # this connection's transport now carries another session
        await trio.sleep_forever()  # the close sequence cancels the nursery

    async def _await_resume(self, dropped: Transport) -> bool:
        """After ``dropped`` ended: True once a resume attached a new
        transport; False when this session ends instead (a close frame, a
        framing error, no resume window, or the window ran out)."""
        if self._incoming is None and (
            self.resume_token is None
            or dropped.peer_close_code != CLOSE_ABNORMAL
            or dropped.local_close_code is not None
        ):
            return False
        self.detached = True
        self.give_up_seat()
        if self._released is not None:  # the connection that lent it may close it now
            self._released.set()
            self._released = None
        await dropped.aclose()
        if self._incoming is None:
            self.hub.metrics.sessions_detached.inc()
            self._attached = trio.Event()
            with trio.move_on_after(self.hub.config.resume_window_s):
                await self._attached.wait()
            self._attached = None
        if self._incoming is None:
            self.detached = False
            return False
        transport, last_seq, released = self._incoming
        self._incoming = None
        self._attach(transport, last_seq, released)
        return True

    def resume_here(self, transport: Transport, last_seq: int, released: trio.Event, identity: Identity) -> None:
        """Take this session over onto ``transport`` (a verified resume), with
        the newer connection's token. A session still attached is taken
        from its connection, which its client has given up on (a half-open
        TCP connection looks alive)."""
        self._incoming = (transport, last_seq, released)
        self.identity = identity
        self._watch_expiry()
        if self.detached:
            if self._attached is not None:
                self._attached.set()
        else:
            self.transport.abort()

    def _attach(self, transport: Transport, last_seq: int, released: trio.Event) -> None:
        assert self._nursery is not None
        self.transport = transport
        self._released = released
        self._received_all = trio.Event()
        transport.on_stalled = self.slow_consumer
        transport.on_drained = self._drained
        transport.start(self._nursery)
        self.flush()  # still detached: what is pending joins the retained events, to replay in order
        self.detached = False
        retained = self._retained or ()
        ts = int(time.time() * 1000)
        if last_seq > self.seq:
            last_seq = self.seq  # a client ahead of the server has nothing to replay
        if last_seq < self._retained_after:
            payloads = [encode_event(
                ResyncRequired(session_id=self.session_id, last_seq=last_seq), seq=self.seq, ts=ts
            )]
            self.hub.metrics.sessions_resumed.labels("resync_required").inc()
        else:
            replay = [  # the events after last_seq: whole batches, and the tail of the one it falls in
                payload
                for first, batch, _size in retained if first + len(batch) - 1 > last_seq
                for payload in batch[max(0, last_seq + 1 - first):]
            ]
            payloads = [encode_event(
                Resumed(session_id=self.session_id, last_seq=last_seq, replayed=len(replay)), seq=last_seq, ts=ts
            ), *replay]
            self.hub.metrics.sessions_resumed.labels("resumed").inc()
        transport.send(payloads)
        log.info("session resumed", extra={"connection_id": self.connection_id, "user_id": self.identity.user_id})

    def _take_over(self, msg: Resume) -> None:
        """A ``resume`` on this (new) connection: hand its transport to the
        session named, when that is one of this user's, the token is its
        own and nothing has happened here yet. Anything else is refused and
        changes nothing."""
        target = find_resumable(self.hub, msg.session_id, self.identity.user_id, msg.resume_token)
        if target is self:
            raise errors.NotFound(_NO_SESSION)
        if self.runs.runs:
            raise errors.BadRequest("resume before sending anything else on a connection")
        self.flush()  # this connection's own connected event goes first
        self.handed_released = trio.Event()
        self.handed_to = target
        target.resume_here(self.transport, msg.last_seq, self.handed_released, self.identity)

    async def _read_messages(self) -> None:
        c = self.hub.config
        transport = self.transport
        bucket = self.bucket
        while not self.closing:
            frame = await transport.receive()
            if frame is None:
                return
            try:
                message = parse_client_message(frame, max_bytes=c.max_message_bytes, max_text_chars=c.max_text_chars)
            except NetraError as exc:
                self.bad_frames += 1
                self.hub.metrics.bad_frames.labels(exc.code).inc()
                if self.bad_frames > c.max_bad_frames:
                    self.close(errors.CLOSE_PROTOCOL_ABUSE, "too many bad frames", cause="protocol_abuse")
                else:
                    self.send(error_event(exc))
                continue
            if not bucket.take():
                self.hub.metrics.bad_frames.labels("rate_limited").inc()
                if bucket.refusals >= c.rate_abuse_limit:
                    self._close_flooding()
                else:
                    self.send(Error(
                        code="rate_limited", message="too many messages; slow down",
                        ref=getattr(message, "id", None), retry_after_ms=bucket.retry_after_ms(),
                    ))
                continue
            try:
                if isinstance(message, Resume) and self._resumes_elsewhere(message):
                    if await self._resume_remote(message):
                        return
                    continue
                self._dispatch(message)
            except NetraError as exc:
                self.send(error_event(exc, ref=getattr(message, "id", None)))
            if self.handed_to is not None:
                return
    def _dispatch(self, message: Any) -> None:
        match message:
            case Ping(id=ping_id):
                self._pong(ping_id)
            case UserMessage():
                self.runs.start(message)
            case Cancel(run_id=run_id, thread_id=thread_id):
                if not self.runs.cancel(run_id=run_id, thread_id=thread_id, by=self.identity.user_id):
                    assert self._nursery is not None  # in a cluster: the run may be on another node
                    self._nursery.start_soon(self._route_cancel, run_id, thread_id, getattr(message, "id", None))
            case Resume():
                self._take_over(message)
            case ToolDecision():  # from any of the user's connections, as a cancel
                routable = self.hub.cluster is not None
                if not self.hub.approvals.decide(self.identity.user_id, message, routable=routable):
                    assert self._nursery is not None  # in a cluster: the run may be on another node
                    self._routing += 1
                    self._nursery.start_soon(self._route_decision, message)
            case Auth(token=token):
                identity = self.hub.verifier.verify(token)  # Unauthorized -> error event
                if identity.user_id != self.identity.user_id:
                    raise errors.Forbidden("a token for another user cannot be used on this connection")
                self.identity = identity
                self._watch_expiry()

    @property
    def handed_off(self) -> bool:
        """This connection's transport carries another session now (here, or on another node)."""
        return self.handed_to is not None or self.handed_link is not None

    def _resumes_elsewhere(self, msg: Resume) -> bool:
        cluster = self.hub.cluster
        return (
            cluster is not None
            and msg.session_id not in self.hub.resumable
            and Ids.prefix_of(msg.session_id) != self.hub.ids.prefix
        )

    async def _resume_remote(self, msg: Resume) -> bool:
        """A resume of a session of another node: ask that node to carry it
        over a link, and relay this connection there (True), or refuse as
        for a session here (NotFound)."""
        cluster = self.hub.cluster
        assert cluster is not None
        if self.runs.runs:
            raise errors.BadRequest("resume before sending anything else on a connection")
        owner = await cluster.owner_of(msg.session_id)
        if owner is None or owner == cluster.node_id:
            raise errors.NotFound(_NO_SESSION)
        link_id = self.hub.ids.new("lnk")
        self.flush()  # this connection's own connected event goes first
        why, inbox = await link.request(cluster, owner, link_id, {
            "op": "resume", "link": link_id, "session_id": msg.session_id, "resume_token": msg.resume_token,
            "last_seq": msg.last_seq, "user_id": self.identity.user_id, "expires_at": self.identity.expires_at,
        })
        if why is not None:
            log.info("resume on another node refused: %s", why, extra={"connection_id": self.connection_id})
            raise errors.NotFound(_NO_SESSION)
        self.handed_link = (link_id, inbox)
        self.hub.metrics.sessions_resumed.labels("relayed").inc()
        return True

    def give_up_seat(self) -> None:
        seat, self.seat = self.seat, None
        if seat is not None:
            seat()

    async def _route_cancel(self, run_id: str | None, thread_id: str | None, ref: str | None) -> None:
        """A cancel of none of this node's runs: the cluster's, where they run."""
        cluster = self.hub.cluster
        assert cluster is not None
        user_id = self.identity.user_id
        try:
            routed = await cluster.route_cancel(user_id, run_id=run_id, thread_id=thread_id, reason="client", by=user_id)
        except NetraError as exc:
            self.send(error_event(exc, ref=ref))
            return
        if not routed:
            self.send(error_event(errors.NotFound("no such run in progress"), ref=ref))

    async def _route_decision(self, message: ToolDecision) -> None:
        """A decision on none of this node's runs: the cluster's, where they run."""
        try:
            await route_decision(self.hub, self.identity.user_id, message)
        except NetraError as exc:
            self.send(error_event(exc, ref=message.id))
        finally:
            self._routing -= 1
            if not self._routing and self._routed is not None:
                self._routed.set()
                self._routed = None

    def _pong(self, ping_id: str | None) -> None:
        """Answer a ping after the decisions sent before it that are still
        being routed: a connection's messages are answered in order, so a
        refused decision's error comes before the pong (clients rely on it
        to learn that a decision was taken)."""
        if not self._routing:
            self.send(Pong(id=ping_id))
            return
        if self._routed is None:
            self._routed = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._pong_after, self._routed, ping_id)

    async def _pong_after(self, routed: trio.Event, ping_id: str | None) -> None:
        await routed.wait()
        self.send(Pong(id=ping_id))

    def queued_events(self) -> int:
        return len(self._pending)


_NO_SESSION = "no session to resume with that id and token (gone, or its window ran out)"


def find_resumable(hub: Hub, session_id: str, user_id: str, resume_token: str) -> Session:
    """The session ``session_id`` of ``user_id`` on this node that
    ``resume_token`` may take over; NotFound, saying nothing more, for any
    other (gone, another user's, a wrong token, closing)."""
    target = hub.resumable.get(session_id)
    if (
        target is None
        or target.closing
        or target.identity.user_id != user_id
        or target.resume_token is None
        or not hmac.compare_digest(target.resume_token, resume_token)
    ):
        raise errors.NotFound(_NO_SESSION)
    return target
