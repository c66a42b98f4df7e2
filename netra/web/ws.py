"""``/ws``: the opening handshake's rules, authentication and connection
limits, then the connection is handed to a :class:`netra.session.Session`.

Every refusal before the upgrade is an HTTP status with a JSON body
(``{"code", "message"}``); after it, a close code (protocol section 7).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import trio

from .. import errors
from ..auth import Identity, bearer_token
from ..cluster import link
from ..errors import BadRequest, Busy, Forbidden, NetraError, Unauthorized
from ..hub import Hub
from ..protocol import SUBPROTOCOL, Auth, parse_client_message
from ..session import Session
from ..transport import HandshakeError, Transport, UpgradeRequest, WebSocketTransport
from ..transport.handshake import accept_response, error_response, parse_upgrade

log = logging.getLogger("netra.web")


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """The server's own origin is always allowed; others only when listed."""
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.netloc == host and parts.scheme in ("http", "https")


async def serve_upgrade(hub: Hub, sock: socket.socket, head: bytes, rest: bytes) -> None:
    """One connection that asked for ``GET /ws``: check, upgrade, serve."""
    c = hub.config
    try:
        request = parse_upgrade(head)
        identity = _check_upgrade(hub, request)
    except HandshakeError as exc:  # not a WebSocket upgrade netra can take
        return await _refuse(hub, sock, exc.status, exc.code, exc.message, exc.headers)
    except NetraError as exc:  # the upgrade is fine, the request is not allowed
        return await _refuse(hub, sock, exc.http_status, exc.code, exc.message)
    if c.send_buffer_bytes > 0:
        try:  # a fixed kernel buffer: a client that stops reading is noticed within its size
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, c.send_buffer_bytes)
        except OSError:
            pass
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.subprotocols else None
    if not await _send_all(sock, accept_response(request.key, subprotocol), c.write_timeout_s):
        return
    transport = WebSocketTransport(
        sock,
        max_message_bytes=c.max_message_bytes,
        write_timeout_s=c.write_timeout_s,
        heartbeat_interval_s=c.heartbeat_interval_s,
        heartbeat_timeout_s=c.heartbeat_timeout_s,
        buffered=rest,
    )
    try:
        await serve_transport(hub, transport, identity)
    finally:
        await transport.aclose()


def _check_upgrade(hub: Hub, request: UpgradeRequest) -> Identity | None:
    """The rules of an upgrade, in the protocol's order (docs/protocol.md
    section 2); the identity when an Authorization header proved one."""
    c = hub.config
    origin = request.header(b"origin")
    if origin is not None and not origin_allowed(origin, request.header(b"host"), c.allowed_origins):
        raise Forbidden("origin not allowed")
    if hub.draining:
        raise Busy("server is shutting down", retry_after_ms=int(c.drain_grace_s * 1000))
    if {"token", "access_token", "jwt"} & parse_qs(request.query).keys():
        raise BadRequest(
            "tokens are never accepted in the query string; use the Authorization header or an auth frame"
        )
    token = bearer_token(request.headers)
    if token is None:
        return None
    try:
        return hub.verifier.verify(token)
    except Unauthorized as exc:
        log.info("upgrade refused: %s", exc.message, extra={"code": 401})
        raise


async def _refuse(
    hub: Hub, sock: socket.socket, status: int, code: str, message: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    hub.metrics.connections_refused.labels(str(status)).inc()
    await _send_all(sock, error_response(status, code, message, headers=headers), hub.config.write_timeout_s)


async def serve_transport(hub: Hub, transport: Transport, identity: Identity | None) -> None:
    """An upgraded connection: authenticate (when the upgrade did not),
    check the connection limits, and serve the session."""
    c, m = hub.config, hub.metrics
    if identity is None:
        with trio.move_on_after(c.auth_timeout_s) as waited:
            frame = await transport.receive()
        if waited.cancelled_caught:
            m.connections_closed.labels(str(errors.CLOSE_AUTH_TIMEOUT)).inc()
            return await close_now(transport, errors.CLOSE_AUTH_TIMEOUT, "authentication timeout", c.close_timeout_s)
        if frame is None:
            return
        try:
            message = parse_client_message(frame, max_bytes=c.max_message_bytes)
            if not isinstance(message, Auth):
                raise Unauthorized("authenticate first: send an auth frame")
            identity = hub.verifier.verify(message.token)
        except NetraError as exc:
            log.info("authentication failed: %s", exc.message, extra={"code": errors.CLOSE_UNAUTHORIZED})
            m.connections_closed.labels(str(errors.CLOSE_UNAUTHORIZED)).inc()
            reason = exc.message if isinstance(exc, Unauthorized) else "authenticate first"
            return await close_now(transport, errors.CLOSE_UNAUTHORIZED, reason, c.close_timeout_s)
    user = hub.user(identity.user_id)
    # a session waiting for its dropped client does not keep that client from coming back to resume it
    attached = sum(not s.detached for s in user.connections)
    if len(hub.sessions) >= c.max_connections or attached >= c.max_connections_per_user:
        hub.forget_user_if_idle(user)
        m.connections_closed.labels(str(errors.CLOSE_TOO_MANY)).inc()
        return await close_now(transport, errors.CLOSE_TOO_MANY, "too many connections", c.close_timeout_s)
    seat = None
    if hub.cluster is not None:  # the user's connections on every node
        seat = await _cluster_seat(hub, transport, identity.user_id)
        if seat is None:
            hub.forget_user_if_idle(user)
            return
    session = Session(hub=hub, transport=transport, identity=identity, user=user, seat=seat)
    try:
        await session.serve()
        if session.handed_released is not None:  # resumed another session: it reads this transport now
            await session.handed_released.wait()
        elif session.handed_link is not None:  # resumed a session of another node: relay to it
            assert hub.cluster is not None
            await link.relay(hub.cluster, transport, *session.handed_link)
    finally:
        session.give_up_seat()


async def _cluster_seat(hub: Hub, transport: Transport, user_id: str) -> Callable[[], None] | None:
    """A place among the user's connections across the cluster, as a
    function that gives it back; None (the connection closed) without one."""
    c, m = hub.config, hub.metrics
    assert hub.cluster is not None
    limiter = hub.cluster.limiter(f"user-conns:{user_id}", c.max_connections_per_user)
    try:
        lease = await limiter.acquire_nowait()
    except trio.WouldBlock:
        m.connections_closed.labels(str(errors.CLOSE_TOO_MANY)).inc()
        await close_now(transport, errors.CLOSE_TOO_MANY, "too many connections", c.close_timeout_s)
        return None
    except NetraError as exc:  # Redis did not answer: the client comes back with backoff
        log.warning("no connection place from the cluster: %s", exc.message)
        m.connections_closed.labels(str(errors.CLOSE_GOING_AWAY)).inc()
        await close_now(transport, errors.CLOSE_GOING_AWAY, "cluster unavailable, try again", c.close_timeout_s)
        return None
    return lambda: limiter.release(lease)


async def close_now(transport: Transport, code: int, reason: str, timeout_s: float) -> None:
    """Close before any session exists: the close frame, then read until the
    peer's close (or ``timeout_s``), then cut."""
    transport.send_close(code, reason)
    with trio.move_on_after(timeout_s):
        while await transport.receive() is not None:
            pass
        return
    transport.abort()


async def _send_all(sock: socket.socket, data: bytes, timeout_s: float) -> bool:
    """Write a handshake response (small: normally one send); False if the
    client did not take it within ``timeout_s`` or is gone."""
    view = memoryview(data)
    with trio.move_on_after(timeout_s):
        try:
            while view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
            return True
        except OSError:
            return False
    return False
