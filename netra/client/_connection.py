"""The Python client: script netra in a few lines.

::

    async with netra.client.connect(url, token) as conn:
        async for event in conn.run("what is [[tool:calculator {\\"expression\\": \\"6*7\\"}]]"):
            print(event.type)

One reader task per connection receives every frame, checks ``seq``, and
routes run events to the ``run`` call that started them (matched first by
the message ``id`` echoed as ``ref``, then by ``run_id``). When the
connection drops without a close frame, the reader opens a new one and
resumes the session (docs/protocol.md section 9): the runs being streamed
go on, with no event lost or repeated. Everything this
module raises is one of :mod:`netra.client._errors`; the transport's own
exceptions are translated where the transport is called.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket

from ..protocol import SUBPROTOCOL, TERMINAL, Received, decode_event
from ._errors import (
    ConnectionClosed,
    ConnectionRefused,
    DecisionRefused,
    ProtocolError,
    RunRefused,
    ServerUnreachable,
)


@attrs.define(eq=False)
class Connection:
    ws: trio_websocket.WebSocketConnection
    connected: dict[str, Any]
    #: Every received event in order, when ``record=True`` (tests, debugging).
    received: list[Received] | None = None
    last_seq: int = 1
    _by_ref: dict[str, trio.MemorySendChannel[Received]] = attrs.field(factory=dict)
    _by_run: dict[str, trio.MemorySendChannel[Received]] = attrs.field(factory=dict)
    _run_refs: dict[str, str] = attrs.field(factory=dict)
    _pongs: dict[str, trio.Event] = attrs.field(factory=dict)
    #: Decisions being sent, by message id: the refusal, once one arrived.
    _decisions: dict[str, dict[str, Any] | None] = attrs.field(factory=dict)
    closed: ConnectionClosed | None = None
    _closed_event: trio.Event = attrs.field(factory=trio.Event)
    #: How to open another WebSocket for a resume (set by :func:`connect`).
    _reopen: Any = None
    #: Set while no WebSocket carries the session (a resume is under way).
    _carried: trio.Event = attrs.field(factory=trio.Event)
    #: Sessions resumed after a drop, and those that needed a resync.
    resumes: int = 0
    resyncs: int = 0
    #: What the runs cut off by a resync raise.
    lost_events: ConnectionClosed | None = None

    def __attrs_post_init__(self) -> None:
        self._carried.set()

    @property
    def user_id(self) -> str:
        return self.connected["user_id"]

    async def send(self, message: dict[str, Any]) -> None:
        """Send a message; during a resume, once the session is back."""
        await self._carried.wait()
        if self.closed is not None:
            raise self.closed
        try:
            await self.ws.send_message(json.dumps(message))
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason.code == 1006 and self._may_resume():
                await self._carried.wait()  # the reader is resuming: send there
                if self.closed is None:
                    await self.ws.send_message(json.dumps(message))
                    return
            raise ConnectionClosed(exc.reason.code, exc.reason.reason) from None

    def run(
        self,
        text: str,
        *,
        thread_id: str | None = None,
        agent: str | None = None,
        id: str | None = None,
        multitask: str | None = None,
    ) -> RunStream:
        """Send a message (on first iteration) and iterate its run's events up
        to the terminal one. Raises RunRefused if the server refuses it,
        ConnectionClosed if the connection ends first. Leaving the loop early
        is fine: later events of that run are dropped."""
        message: dict[str, Any] = {"type": "user_message", "text": text, "id": id or uuid.uuid4().hex}
        for key, value in (("thread_id", thread_id), ("agent", agent), ("multitask", multitask)):
            if value is not None:
                message[key] = value
        return RunStream(self, message)

    async def collect(self, text: str, **kwargs: Any) -> list[Received]:
        """All events of one run, as a list."""
        return [e async for e in self.run(text, **kwargs)]

    async def cancel(self, *, run_id: str | None = None, thread_id: str | None = None) -> None:
        await self.send({"type": "cancel", "run_id": run_id, "thread_id": thread_id})

    async def decide(
        self,
        run_id: str,
        tool_call_id: str,
        *,
        approve: bool,
        args: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        """Answer an ``approval_required``: approve the call (with ``args``
        in place of the model's, when given) or deny it (``reason`` is told
        to the model). Any connection of the run's user may decide. Returns
        once the server took the decision; raises :class:`DecisionRefused`
        when it did not (``not_found``: no such call waits, e.g. it was
        decided elsewhere or expired; ``bad_request``: the arguments do not
        fit the tool, and the call still waits)."""
        message: dict[str, Any] = {
            "type": "tool_decision", "id": uuid.uuid4().hex, "run_id": run_id,
            "tool_call_id": tool_call_id, "decision": "approve" if approve else "deny",
        }
        if args is not None:
            message["args"] = args
        if reason is not None:
            message["reason"] = reason
        self._decisions[message["id"]] = None
        try:
            await self.send(message)
            # The server handles a connection's messages in order and answers
            # a refused one at once, so its error comes before this pong.
            answered = await self._round_trip()
            refusal = self._decisions[message["id"]]
        finally:
            self._decisions.pop(message["id"], None)
        if refusal is None and not answered:
            raise self.closed or ConnectionClosed(None, "closed")
        if refusal is not None:
            raise DecisionRefused(refusal.get("code", ""), refusal.get("message", ""), refusal)

    async def ping(self) -> float:
        """Round trip time in seconds."""
        start = trio.current_time()
        await self._round_trip()
        return trio.current_time() - start

    async def _round_trip(self) -> bool:
        """A ping and its pong; False when the connection ended first."""
        ping_id = uuid.uuid4().hex
        done = self._pongs[ping_id] = trio.Event()
        try:
            await self.send({"type": "ping", "id": ping_id})
            await done.wait()
        finally:
            answered = self._pongs.pop(ping_id, None) is None  # the pong took it
        return answered

    async def refresh(self, token: str) -> None:
        await self.send({"type": "auth", "token": token})

    async def wait_closed(self) -> ConnectionClosed:
        await self._closed_event.wait()
        assert self.closed is not None
        return self.closed

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    received = _decode(await self.ws.get_message())
                except trio_websocket.ConnectionClosed as exc:
                    if exc.reason.code == 1006 and self._may_resume():
                        self._carried = trio.Event()
                        try:
                            if await self._resume():
                                continue
                        finally:
                            self._carried.set()
                    self.closed = ConnectionClosed(exc.reason.code, exc.reason.reason)
                    return
                if received.seq != self.last_seq + 1:
                    raise ProtocolError(f"seq gap: {self.last_seq} then {received.seq}")
                self.last_seq = received.seq
                if self.received is not None:
                    self.received.append(received)
                self._route(received)
        finally:
            if self.closed is None:
                self.closed = ConnectionClosed(None, "reader stopped")
            for channel in [*self._by_ref.values(), *self._by_run.values()]:
                channel.close()
            for done in self._pongs.values():
                done.set()
            self._closed_event.set()

    def _may_resume(self) -> bool:
        return self._reopen is not None and bool(self.connected.get("resume_token"))

    async def _resume(self) -> bool:
        """Open new WebSockets (with backoff) until one takes the session
        over, within the server's resume window. A resync means events were
        lost: the runs waiting for them end with ConnectionClosed (read the
        thread back); the session goes on."""
        window = float((self.connected.get("limits") or {}).get("resume_window_s") or 30.0)
        delay = 0.1
        with trio.move_on_after(window):
            while True:
                try:
                    ws = await self._reopen()
                    await ws.send_message(json.dumps({
                        "type": "resume", "session_id": self.connected["session_id"],
                        "resume_token": self.connected["resume_token"], "last_seq": self.last_seq,
                    }))
                    while True:
                        answer = _decode(await ws.get_message())
                        if answer.type in ("resumed", "resync_required", "error"):
                            break
                except (OSError, trio.TooSlowError, trio_websocket.HandshakeError,
                        trio_websocket.ConnectionClosed, trio_websocket.ConnectionRejected):
                    await trio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if answer.type == "error":  # gone: its window ran out, or it ended
                    await ws.aclose()
                    return False
                self.ws = ws
                self.resumes += 1
                if answer.type == "resync_required":
                    self.resyncs += 1
                    self.last_seq = answer.seq
                    self.lost_events = ConnectionClosed(None, "events were lost (resync_required): read the thread back")
                    for channel in [*self._by_ref.values(), *self._by_run.values()]:
                        channel.close()  # their events may be lost: read the thread back
                    self._by_ref.clear()
                    self._by_run.clear()
                    self._run_refs.clear()
                if self.received is not None:
                    self.received.append(answer)
                return True
        return False

    def _route(self, received: Received) -> None:
        raw = received.raw
        kind = received.type
        if kind == "pong":
            done = self._pongs.pop(raw.get("id") or "", None)
            if done is not None:
                done.set()
            return
        ref, run_id = raw.get("ref"), raw.get("run_id")
        if kind == "error" and ref in self._decisions:
            self._decisions[ref] = raw
            return
        channel = None
        if run_id is not None:
            channel = self._by_run.get(run_id)
            if channel is None and ref in self._by_ref:
                channel = self._by_run[run_id] = self._by_ref[ref]
                self._run_refs[run_id] = ref
        if kind == "error" and ref in self._by_ref:
            channel = self._by_ref.pop(ref)
            _deliver(channel, received)
            channel.close()
            return
        if channel is not None and (not _deliver(channel, received) or kind in TERMINAL):
            # done, or abandoned by a caller that left its loop: forget the run
            self._by_run.pop(run_id, None)
            self._by_ref.pop(self._run_refs.pop(run_id, ""), None)


def _deliver(channel: trio.MemorySendChannel[Received], received: Received) -> bool:
    """False when nobody listens any more (the caller left its loop)."""
    try:
        channel.send_nowait(received)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False


@attrs.define(eq=False)
class RunStream:
    """The events of one run, as an async iterator."""

    conn: Connection
    message: dict[str, Any]
    _recv: trio.MemoryReceiveChannel[Received] | None = None
    done: bool = False

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> Received:
        if self.done:
            raise StopAsyncIteration
        if self._recv is None:
            send, self._recv = trio.open_memory_channel[Received](math.inf)
            self.conn._by_ref[self.message["id"]] = send
            await self.conn.send(self.message)
        try:
            received = await self._recv.receive()
        except trio.EndOfChannel:
            self.done = True
            raise self.conn.closed or self.conn.lost_events or ConnectionClosed(None, "closed") from None
        if received.type == "error":
            self.done = True
            raw = received.raw
            raise RunRefused(raw.get("code", ""), raw.get("message", ""), raw)
        if received.type in TERMINAL:
            self.done = True
            self.conn._by_ref.pop(self.message["id"], None)
        return received


@asynccontextmanager
async def connect(
    url: str,
    token: str,
    *,
    auth: str = "header",
    record: bool = False,
    connect_timeout: float = 10.0,
    extra_headers: list[tuple[str, str]] | None = None,
    resume: bool = True,
) -> AsyncIterator[Connection]:
    """Open an authenticated connection (token in the ``Authorization`` header,
    or with ``auth="frame"`` in a first ``auth`` frame, as browsers do).

    Raises :class:`ServerUnreachable` when no WebSocket can be opened within
    ``connect_timeout``, :class:`ConnectionRefused` when the server refuses
    the upgrade (a bad header token: status 401, code ``unauthorized``), and
    :class:`ConnectionClosed` when it closes before ``connected`` (a bad
    frame token: code 4401). With ``resume`` (and a server that offers it),
    a connection that drops without a close frame is resumed on a new one
    by itself."""
    if auth not in ("header", "frame"):
        raise ValueError(f"auth must be 'header' or 'frame', not {auth!r}")
    headers = list(extra_headers or [])
    if auth == "header":
        headers.append(("Authorization", f"Bearer {token}"))
    handshaking = True
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await trio_websocket.connect_websocket_url(
                    nursery, url, subprotocols=[SUBPROTOCOL], extra_headers=headers
                )
                if auth == "frame":
                    await ws.send_message(json.dumps({"type": "auth", "token": token}))
                first = _decode(await ws.get_message())
            if first.type != "connected":
                await ws.aclose()
                raise ProtocolError(f"expected 'connected', got {first.type!r}")
            handshaking = False
            conn = Connection(ws=ws, connected=first.raw, received=[first] if record else None)

            async def reopen() -> trio_websocket.WebSocketConnection:
                with trio.fail_after(connect_timeout):
                    again = await trio_websocket.connect_websocket_url(
                        nursery, url, subprotocols=[SUBPROTOCOL], extra_headers=headers
                    )
                    if auth == "frame":
                        await again.send_message(json.dumps({"type": "auth", "token": token}))
                    if _decode(await again.get_message()).type != "connected":
                        await again.aclose()
                        raise trio_websocket.HandshakeError("no connected event")
                    return again

            if resume:
                conn._reopen = reopen
            nursery.start_soon(conn._reader)
            try:
                yield conn
            finally:
                conn._reopen = None  # leaving: a drop now is the end
                await conn.ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = _single(group)
        raise (_translate(leaf, url, connect_timeout) if handshaking else leaf) from None


def _translate(exc: BaseException, url: str, timeout: float) -> BaseException:
    """A failure of the handshake (trio-websocket's, the socket layer's, or
    the connect timeout) as the client's own error. Only for the handshake:
    an OSError or TooSlowError of the caller's own code is none of ours."""
    match exc:
        case trio_websocket.ConnectionRejected():
            return ConnectionRefused.from_response(exc.status_code, exc.body)
        case trio_websocket.ConnectionClosed():
            reason = exc.reason
            return ConnectionClosed(reason.code if reason else None, reason.reason if reason else None)
        case trio.TooSlowError():
            return ServerUnreachable(url, f"no answer within {timeout:g} s")
        case OSError() | trio_websocket.HandshakeError():
            return ServerUnreachable(url, _describe(exc))
    return exc


def _decode(message: str | bytes) -> Received:
    try:
        received = decode_event(message)
    except Exception as exc:  # json, attribute and type errors of a frame that is no event
        raise ProtocolError(f"the server sent a frame that is not a protocol v1 event ({type(exc).__name__})") from None
    if not isinstance(received.seq, int):
        raise ProtocolError("the server sent an event without an integer seq")
    return received


def _describe(exc: BaseException) -> str:
    """What went wrong, in a few words: "connection refused". (trio's "all
    attempts to connect failed" keeps each attempt's error in its cause.)"""
    attempts = exc.__cause__
    if isinstance(exc, OSError) and exc.errno is None and isinstance(attempts, BaseExceptionGroup):
        exc = next((e for e in attempts.exceptions if isinstance(e, OSError) and e.errno is not None), exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        text = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else exc.strerror or ""
        if text:
            return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one real exception of a nursery's group (callers of a client
    library should not have to handle trio's exception groups)."""
    rest = group.split(trio.Cancelled)[1]
    leaves: list[BaseException] = []

    def flatten(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                flatten(inner)
        else:
            leaves.append(exc)

    flatten(rest if rest is not None else group)
    if len(leaves) > 1:  # e.g. the handshake's own error and its reader task's
        leaves = [exc for exc in leaves if not isinstance(exc, trio_websocket.ConnectionClosed)] or leaves
    return leaves[0] if len(leaves) == 1 else group
