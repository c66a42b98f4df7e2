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

import collections
import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio
from coredis.tokens import PureToken

from .. import _json
from ..errors import StoreError
from ..transport import Transport
from ..transport.frames import CLOSE_ABNORMAL
from ._redis import as_text

if TYPE_CHECKING:
    from .node import ClusterNode

log = logging.getLogger("netra.cluster")

#: How long the node's one blocking read of every link waits at a time
#: (a link opened meanwhile joins the next read: at most this late).
_BLOCK_MS = 50
#: A link's streams outlive their last write by this much (then Redis drops them).
_STREAM_TTL_S = 300
#: Entries kept per stream (a reader behind by more than this is a dead one).
_MAX_ENTRIES = 10_000


def link_keys(node: ClusterNode, link_id: str) -> tuple[str, str]:
    """The link's streams: (owner to relay, relay to owner)."""
    return f"{node.prefix}link:{link_id}:out", f"{node.prefix}link:{link_id}:in"


@attrs.define(eq=False)
class Inbox:
    """What one link side has read of the other's stream, not yet taken."""

    entries: collections.deque[dict[str, str]] = attrs.field(factory=collections.deque)
    arrived: trio.Event = attrs.field(factory=trio.Event)
    last_id: str = "0-0"

    async def take(self, silence_s: float) -> list[dict[str, str]] | None:
        """The entries read so far, waiting for one; None after ``silence_s`` without any."""
        if not self.entries:
            with trio.move_on_after(silence_s):
                await self.arrived.wait()
            if not self.entries:
                return None
        self.arrived = trio.Event()
        taken = list(self.entries)
        self.entries.clear()
        return taken


@attrs.define(eq=False)
class LinkReader:
    """The node's one reader of every link stream its sides read: a single
    blocking ``XREAD`` of all of them at a time, instead of a Redis
    connection held by each (a pool has a few dozen)."""

    node: ClusterNode
    inboxes: dict[str, Inbox] = attrs.field(factory=dict)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)

    def open(self, key: str) -> Inbox:
        inbox = self.inboxes[key] = Inbox()
        self._wakeup.set()
        return inbox

    def close(self, key: str) -> None:
        self.inboxes.pop(key, None)

    async def run(self) -> None:
        node = self.node
        while True:
            if not self.inboxes:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            wanted = {key: inbox.last_id for key, inbox in self.inboxes.items()}
            try:
                reply = await node._call(lambda: node.redis.xread(wanted, count=256, block=_BLOCK_MS))
            except StoreError as exc:  # each side notices the silence by itself
                log.warning("reading the links failed: %r", exc)
                await trio.sleep(_BLOCK_MS / 1000)
                continue
            for key, entries in (reply or {}).items():
                inbox = self.inboxes.get(as_text(key))
                if inbox is None or not entries:
                    continue
                for entry in entries:
                    inbox.entries.append({as_text(k): as_text(v) for k, v in entry.field_values.items()})
                inbox.last_id = as_text(entries[-1].identifier)
                inbox.arrived.set()


class _Pumps:
    """Writes a side's entries to its stream in order, with keepalives, and
    reads the other side's through the node's reader, noticing a silence
    of one TTL."""

    def __init__(self, node: ClusterNode, write_key: str, read_key: str, inbox: Inbox | None = None) -> None:
        self.node = node
        self.write_key = write_key
        self.read_key = read_key
        self.inbox = inbox if inbox is not None else node.links.open(read_key)
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

    async def read(self, silence_s: float | None = None) -> list[dict[str, str]] | None:
        """The other side's next entries, or None once it has been silent
        for ``silence_s`` (a TTL: it is gone)."""
        return await self.inbox.take(self.node.ttl if silence_s is None else silence_s)

    def close(self) -> None:
        self.node.links.close(self.read_key)


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
                self._pumps.close()
                if self.peer_close_code is None:
                    self.peer_close_code = CLOSE_ABNORMAL
                    self.lost = self.lost or "link"
                self._frames_in.close()

    async def _read_forever(self) -> None:
        async with self._frames_in:
            while True:
                entries = await self._pumps.read()
                if entries is None:
                    self.lost = "link"
                    return
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


async def request(node: ClusterNode, owner: str, link_id: str, message: dict[str, Any]) -> tuple[str | None, Inbox]:
    """Ask ``owner`` to resume a session over ``link_id``: (None, what the
    relay reads from) when it did, else (why not, in words for the log)."""
    out_key, _ = link_keys(node, link_id)
    inbox = node.links.open(out_key)
    try:
        receivers = await node._call(
            lambda: node.redis.publish(node._control_channel(owner), _json.dumps_str(message))
        )
        if not receivers:
            return "the node that held the session is gone", inbox
        first = await inbox.take(max(node.ttl, node.keeper.timeout))
    except BaseException:
        node.links.close(out_key)
        raise
    if not first:
        node.links.close(out_key)
        return "the node that held the session did not answer", inbox
    if "ok" not in first[0]:
        node.links.close(out_key)
        return first[0].get("refused", "refused"), inbox
    inbox.entries.extendleft(reversed(first[1:]))  # what came with the answer is the relay's
    if inbox.entries:
        inbox.arrived.set()
    return None, inbox


async def relay(node: ClusterNode, transport: Transport, link_id: str, inbox: Inbox) -> None:
    """The relay's end: carry the client's frames to the owner and the
    owner's events (read into ``inbox``) to the client, until either side ends."""
    out_key, in_key = link_keys(node, link_id)
    pumps = _Pumps(node, in_key, out_key, inbox)
    transport.on_stalled = transport.abort  # the owner keeps the session for a resume
    written = trio.Event()

    async def write() -> None:
        try:
            await pumps.write_forever()
        finally:
            written.set()

    async def to_client() -> None:
        while True:
            entries = await pumps.read()
            if entries is None:  # the owner is gone: the client will resume (and be told)
                transport.abort()
                return
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
    finally:
        pumps.close()
    await transport.aclose()
