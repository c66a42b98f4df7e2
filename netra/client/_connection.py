"""The Python client: script netra in a few lines.

::

    async with netra.client.connect(url, token) as conn:
        async for event in conn.run("what is [[tool:calculator {\\"expression\\": \\"6*7\\"}]]"):
            print(event.type)

One reader task per connection receives every frame, checks ``seq``, and
routes run events to the ``run`` call that started them (matched first by
the message ``id`` echoed as ``ref``, then by ``run_id``). Everything this
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
    closed: ConnectionClosed | None = None
    _closed_event: trio.Event = attrs.field(factory=trio.Event)

    @property
    def user_id(self) -> str:
        return self.connected["user_id"]

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self.ws.send_message(json.dumps(message))
        except trio_websocket.ConnectionClosed as exc:
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

    async def ping(self) -> float:
        """Round trip time in seconds."""
        ping_id = uuid.uuid4().hex
        done = self._pongs[ping_id] = trio.Event()
        start = trio.current_time()
        await self.send({"type": "ping", "id": ping_id})
        await done.wait()
        return trio.current_time() - start

    async def refresh(self, token: str) -> None:
        await self.send({"type": "auth", "token": token})

    async def wait_closed(self) -> ConnectionClosed:
        await self._closed_event.wait()
        assert self.closed is not None
        return self.closed

    async def _reader(self) -> None:
        try:
            while True:
                received = _decode(await self.ws.get_message())
                if received.seq != self.last_seq + 1:
                    raise ProtocolError(f"seq gap: {self.last_seq} then {received.seq}")
                self.last_seq = received.seq
                if self.received is not None:
                    self.received.append(received)
                self._route(received)
        except trio_websocket.ConnectionClosed as exc:
            self.closed = ConnectionClosed(exc.reason.code, exc.reason.reason)
        finally:
            if self.closed is None:
                self.closed = ConnectionClosed(None, "reader stopped")
            for channel in [*self._by_ref.values(), *self._by_run.values()]:
                channel.close()
            for done in self._pongs.values():
                done.set()
            self._closed_event.set()

    def _route(self, received: Received) -> None:
        raw = received.raw
        kind = received.type
        if kind == "pong":
            done = self._pongs.pop(raw.get("id") or "", None)
            if done is not None:
                done.set()
            return
        ref, run_id = raw.get("ref"), raw.get("run_id")
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
            raise self.conn.closed or ConnectionClosed(None, "closed") from None
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
) -> AsyncIterator[Connection]:
    """Open an authenticated connection (token in the ``Authorization`` header,
    or with ``auth="frame"`` in a first ``auth`` frame, as browsers do).

    Raises :class:`ServerUnreachable` when no WebSocket can be opened within
    ``connect_timeout``, :class:`ConnectionRefused` when the server refuses
    the upgrade (a bad header token: status 401, code ``unauthorized``), and
    :class:`ConnectionClosed` when it closes before ``connected`` (a bad
    frame token: code 4401)."""
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
            nursery.start_soon(conn._reader)
            try:
                yield conn
            finally:
                await ws.aclose()
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
