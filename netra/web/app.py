"""The app factory: a quart-trio app for the HTTP side.

HTTP routes (health, readiness, metrics, the threads API, the chat page,
AG-UI's ``/agui``) are ordinary quart routes served by hypercorn
(:mod:`netra.web.http`). ``/ws``
never reaches this app: the listener hands it to netra's own WebSocket path
(:mod:`netra.web.ws`).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from ..agui import register_agui
from ..auth import bearer_token
from ..errors import NetraError
from ..hub import Hub
from .api import register_api
from .pages import register_pages

log = logging.getLogger("netra.web")


def create_app(hub: Hub) -> QuartTrio:
    app = QuartTrio("netra", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    app.extensions["netra"] = hub

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
        if hub.mcp.connections:
            problems.extend(await hub.mcp.problems(timeout_s=2))
        body = {"ready": not problems, "problems": problems, **hub.snapshot()}
        if hub.mcp.connections:
            body["mcp"] = hub.mcp.states()
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
    register_agui(app, hub)
    return app
