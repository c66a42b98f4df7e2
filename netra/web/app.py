"""The app factory: a quart-trio app for HTTP, with ``/ws`` served below it.

HTTP routes (health, readiness, metrics, the threads API, the chat page) are
ordinary quart routes. ``/ws`` is dispatched at the ASGI layer, before quart,
to :func:`serve_websocket` (see :mod:`netra.web.ws` for why).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from .. import errors
from ..auth import bearer_token
from ..errors import NetraError, Unauthorized
from ..hub import Hub
from ..protocol import SUBPROTOCOL, Auth, parse_client_message
from ..session import Session
from .api import register_api
from .pages import register_pages
from .ws import WebSocket

log = logging.getLogger("netra.web")


def create_app(hub: Hub) -> QuartTrio:
    app = QuartTrio("netra", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    app.extensions["netra"] = hub

    @app.before_serving
    async def _open_store() -> None:
        if hub.store is not None:
            await hub.store.open()

    @app.after_serving
    async def _close_store() -> None:
        if hub.store is not None:
            await hub.store.aclose()
        aclose = getattr(hub.model, "aclose", None)  # a provider's HTTP client
        if aclose is not None:
            await aclose()

    @app.get("/healthz")
    async def healthz() -> Any:
        return jsonify(status="ok", version=hub.version)

    @app.get("/readyz")
    async def readyz() -> Any:
        problems = []
        if hub.draining:
            problems.append("draining")
        if hub.store is not None:
            try:
                with trio.fail_after(2):
                    await hub.store.ping()
            except (NetraError, trio.TooSlowError):
                problems.append("store unavailable")
        body = {"ready": not problems, "problems": problems, **hub.snapshot()}
        return jsonify(body), (503 if problems else 200)

    @app.get("/metrics")
    async def metrics() -> Any:
        token = hub.config.metrics_token
        if token is not None:
            given = bearer_token([(b"authorization", request.headers.get("authorization", "").encode())])
            if not given or not hmac.compare_digest(given, token):
                return jsonify(code="unauthorized", message="metrics need a bearer token"), 401
        return Response(hub.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    register_pages(app, hub)
    register_api(app, hub)

    http_app = app.asgi_app

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            await serve_websocket(hub, WebSocket(scope, receive, send))
        else:
            await http_app(scope, receive, send)

    app.asgi_app = asgi  # type: ignore[method-assign]
    return app


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """The server's own origin is always allowed; others only when listed."""
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.netloc == host and parts.scheme in ("http", "https")


async def serve_websocket(hub: Hub, ws: WebSocket) -> None:
    """Handshake (origin, auth, limits), then hand the connection to a Session."""
    c, m = hub.config, hub.metrics
    if not await ws.wait_connect():
        return
    origin = ws.header(b"origin")
    if origin is not None and not origin_allowed(origin, ws.header(b"host"), c.allowed_origins):
        m.connections_refused.labels("403").inc()
        return await ws.reject(403, {"code": "forbidden", "message": "origin not allowed"})
    if hub.draining:
        m.connections_refused.labels("503").inc()
        return await ws.reject(503, {"code": "busy", "message": "server is shutting down"})
    query = parse_qs(ws.scope.get("query_string", b"").decode("latin-1"))
    if {"token", "access_token", "jwt"} & query.keys():
        m.connections_refused.labels("400").inc()
        return await ws.reject(400, {
            "code": "bad_request",
            "message": "tokens are never accepted in the query string; use the Authorization header or an auth frame",
        })
    token = bearer_token(ws.scope.get("headers", []))
    identity = None
    if token is not None:
        try:
            identity = hub.verifier.verify(token)
        except Unauthorized as exc:
            log.info("upgrade refused: %s", exc.message, extra={"code": 401})
            m.connections_refused.labels("401").inc()
            return await ws.reject(401, {"code": exc.code, "message": exc.message})
    await ws.accept(SUBPROTOCOL if SUBPROTOCOL in ws.subprotocols else None)
    try:
        await _serve_accepted(hub, ws, identity)
    finally:
        with trio.CancelScope(shield=True):
            await ws.finish(c.close_timeout_s)


async def _serve_accepted(hub: Hub, ws: WebSocket, identity: object | None) -> None:
    c, m = hub.config, hub.metrics
    if identity is None:
        with trio.move_on_after(c.auth_timeout_s) as waited:
            frame = await ws.receive()
        if waited.cancelled_caught:
            m.connections_closed.labels(str(errors.CLOSE_AUTH_TIMEOUT)).inc()
            return await ws.close(errors.CLOSE_AUTH_TIMEOUT, "authentication timeout")
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
            return await ws.close(errors.CLOSE_UNAUTHORIZED, reason)
    user = hub.user(identity.user_id)
    if len(hub.sessions) >= c.max_connections or len(user.connections) >= c.max_connections_per_user:
        hub.forget_user_if_idle(user)
        m.connections_closed.labels(str(errors.CLOSE_TOO_MANY)).inc()
        return await ws.close(errors.CLOSE_TOO_MANY, "too many connections")
    await Session(hub=hub, ws=ws, identity=identity, user=user).serve()
