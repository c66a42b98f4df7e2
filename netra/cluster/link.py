"""A session resumed on another node: its connection, carried through Redis.

A session lives on the node where its connection arrived, with its runs and
its seq numbering. When its client comes back after a drop and the load
balancer sends the new connection to another node, that node (the *relay*)
asks the owner, on the owner's control channel, to resume the session over
a *link*: two Redis streams, ``link:ID:out`` (owner to relay: batches of
encoded events, a close, keepalives) and ``link:ID:in`` (relay to owner:
client frames, the end of the connection, keepalives). On the owner the link
is a :class:`LinkTransport`, so the session neither knows nor cares; on the
relay :func:`relay` pumps between the client's WebSocket and the streams.

Each side writes a keepalive when it has had nothing to write for a third of
the lease TTL, and takes a silence of a whole TTL for the other side's
death: the owner then sees its connection lost (the session waits for a
resume again, as after any drop), the relay cuts its client (who resumes
again, and finds the session gone if the owner died with it).

Limits: a session is resumed only while its node is alive (its runs are
there); each hop adds a Redis round trip to every event of a resumed
session; the client's slowness on the relay cuts its connection (1006 for
the owner, which keeps the session for a resume) rather than closing 4430.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from coredis.tokens import PureToken

from .. import _json
from ..transport import Transport
from ..transport.frames import CLOSE_ABNORMAL
from ._redis import as_text

if TYPE_CHECKING:
    from .node import ClusterNode

log = logging.getLogger("netra.cluster")

#: How long one blocking read waits before it looks at the clock again.
_BLOCK_MS = 1000
#: A link's streams outlive their last write by this much (then Redis drops them).
_STREAM_TTL_S = 300
#: Entries kept per stream (a reader behind by more than this is a dead one).
_MAX_ENTRIES = 10_000


def link_keys(node: ClusterNode, link_id: str) -> tuple[str, str]:
    """The link's streams: (owner to relay, relay to owner)."""
    return f"{node.prefix}link:{link_id}:out", f"{node.prefix}link:{link_id}:in"


class _Pumps:
    """Writes a side's entries to its stream in order, with keepalives, and
    reads the other side's, noticing a silence of one TTL."""

    def __init__(self, node: ClusterNode, write_key: str, read_key: str) -> None:
        self.node = node
        self.write_key = write_key
        self.read_key = read_key
        self.outbox: list[dict[str, Any]] = []
        self.wakeup = trio.Event()
        self.finished = False  # the last entry is in the outbox: write it and stop

    def put(self, entry: dict[str, Any], *, last: bool = False) -> None:
        if self.finished:
            return
        self.outbox.append(entry)
        self.finished = last
        self.wakeup.set()

    async def write_forever(self) -> None:
        node = self.node
        idle = node.ttl / 3
        while True:
            with trio.move_on_after(idle):
                await self.wakeup.wait()
            self.wakeup = trio.Event()
            batch, self.outbox = self.outbox, []
            if not batch:
                batch = [{"k": "1"}]
            for entry in batch:
                await node._call(lambda e=entry: node.redis.xadd(
                    self.write_key, e, trim_strategy=PureToken.MAXLEN, threshold=_MAX_ENTRIES,
                    trim_operator=PureToken.APPROXIMATELY,
                ))
            await node._call(lambda: node.redis.expire(self.write_key, _STREAM_TTL_S))
            if self.finished and not self.outbox:
                return

    async def read(self, last_id: str, *, count: int = 256) -> tuple[str, list[dict[str, str]]] | None:
        """The next entries after ``last_id`` (with the new last id), or
        None once the other side has been silent for a TTL."""
        node = self.node
        deadline = trio.current_time() + node.ttl
        while trio.current_time() < deadline:
            reply = await node._call(lambda: node.redis.xread({self.read_key: last_id}, count=count, block=_BLOCK_MS))
            if not reply:
                continue
            entries = []
            for entry in next(iter(reply.values())):
                last_id = as_text(entry.identifier)
                entries.append({as_text(k): as_text(v) for k, v in entry.field_values.items()})
            return last_id, entries
        return None


class LinkTransport(Transport):
    """The owner's end of a link: a :class:`~netra.transport.Transport`
    whose client is a relay on another node."""

    __slots__ = ("_pumps", "_frames_in", "_frames_out", "_stop", "link_id")

    def __init__(self, node: ClusterNode, link_id: str, *, write_timeout_s: float) -> None:
        super().__init__(write_timeout_s=write_timeout_s)
        self.link_id = link_id
        out_key, in_key = link_keys(node, link_id)
        self._pumps = _Pumps(node, out_key, in_key)
        self._frames_in, self._frames_out = trio.open_memory_channel[str | bytes](256)
        self._stop = trio.CancelScope()
        self._pumps.put({"ok": "1"})  # the relay's answer: the session is resumed

    def start(self, nursery: trio.Nursery) -> None:
        super().start(nursery)
        nursery.start_soon(self._run, name="netra.cluster.link")

    async def _run(self) -> None:
        with self._stop:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pumps.write_forever)
                    await self._read_forever()
                    # the relay is gone or has ended: nothing more to tell it
                    self._pumps.finished = True
                    self._pumps.outbox.clear()
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # Redis failed under the link: as a dropped connection
                log.warning("a resumed session's link to its relay failed: %r", exc)
            finally:
                if self.peer_close_code is None:
                    self.peer_close_code = CLOSE_ABNORMAL
                    self.lost = self.lost or "link"
                self._frames_in.close()

    async def _read_forever(self) -> None:
        last_id = "0-0"
        async with self._frames_in:
            while True:
                got = await self._pumps.read(last_id)
                if got is None:
                    self.lost = "link"
                    return
                last_id, entries = got
                for entry in entries:
                    if "f" in entry:
                        frame = entry["f"]
                        await self._frames_in.send(frame.encode() if entry.get("b") else frame)
                    elif "end" in entry:
                        self.peer_close_code = int(entry["end"])
                        return

    async def receive(self) -> str | bytes | None:
        try:
            return await self._frames_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def send(self, payloads: list[bytes]) -> None:
        if not self.send_closed and payloads:
            self._pumps.put({"p": b"\n".join(payloads)})

    def send_close(self, code: int, reason: str = "") -> None:
        if self.send_closed:
            return
        self.send_closed = True
        self.local_close_code = code
        self._pumps.put({"close": str(code), "reason": reason})

    def abort(self) -> None:
        if self.peer_close_code is None:
            self.peer_close_code = CLOSE_ABNORMAL
            self.lost = self.lost or "aborted"
        self.send_closed = True
        self._pumps.put({"abort": "1"}, last=True)
        self._frames_in.close()

    async def aclose(self) -> None:
        self._pumps.put({"abort": "1"}, last=True)
        # a writer still running sends what is left (bounded by the node's timeout), then stops
        with trio.move_on_after(self._pumps.node.keeper.timeout):
            while self._pumps.outbox:
                await trio.sleep(0.01)
        self._stop.cancel()

    def _flush_backlog(self) -> bool:
        return True

    async def _wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()


async def request(node: ClusterNode, owner: str, link_id: str, message: dict[str, Any]) -> tuple[str | None, str]:
    """Ask ``owner`` to resume a session over ``link_id``: (None, the id of
    its answer) when it did, else (why not, in words for the client, "")."""
    out_key, _ = link_keys(node, link_id)
    pumps = _Pumps(node, "", out_key)
    receivers = await node._call(
        lambda: node.redis.publish(node._control_channel(owner), _json.dumps_str(message))
    )
    if not receivers:
        return "the node that held the session is gone", ""
    got = await pumps.read("0-0", count=1)
    if got is None or not got[1]:
        return "the node that held the session did not answer", ""
    last_id, (first,) = got
    return (None, last_id) if "ok" in first else (first.get("refused", "refused"), "")


async def relay(node: ClusterNode, transport: Transport, link_id: str, after: str) -> None:
    """The relay's end: carry the client's frames to the owner and the
    owner's events (those after the entry ``after``) to the client, until
    either side ends."""
    out_key, in_key = link_keys(node, link_id)
    pumps = _Pumps(node, in_key, out_key)
    transport.on_stalled = transport.abort  # the owner keeps the session for a resume
    written = trio.Event()

    async def write() -> None:
        try:
            await pumps.write_forever()
        finally:
            written.set()

    async def to_client() -> None:
        last_id = after
        while True:
            got = await pumps.read(last_id)
            if got is None:  # the owner is gone: the client will resume (and be told)
                transport.abort()
                return
            last_id, entries = got
            for entry in entries:
                if "p" in entry:
                    transport.send([p.encode() for p in entry["p"].split("\n")])
                elif "close" in entry:
                    transport.send_close(int(entry["close"]), entry.get("reason", ""))
                elif "abort" in entry:
                    transport.abort()
                    return

    try:
        async with trio.open_nursery() as nursery:
            transport.start(nursery)
            nursery.start_soon(write)
            nursery.start_soon(to_client)
            try:
                while (frame := await transport.receive()) is not None:
                    if isinstance(frame, bytes):
                        pumps.put({"f": frame.decode("utf-8", "replace"), "b": "1"})
                    else:
                        pumps.put({"f": frame})
            finally:
                code = transport.peer_close_code if transport.peer_close_code is not None else CLOSE_ABNORMAL
                pumps.put({"end": str(code)}, last=True)
                with trio.move_on_after(node.keeper.timeout):  # the owner hears of the end
                    await written.wait()
                nursery.cancel_scope.cancel()
    except Exception as exc:  # Redis failed under the link: the client resumes again
        log.warning("relaying a resumed session failed: %r", exc)
        transport.abort()
    await transport.aclose()
