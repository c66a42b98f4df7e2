"""The threads API: read back and delete stored conversations.

Authenticated with the same JWT as ``/ws`` (``Authorization: Bearer``); a user
only ever sees their own threads, and a thread of someone else is answered
exactly like one that does not exist (404).
"""

from __future__ import annotations

from typing import Any

import attrs
from quart import jsonify, request
from quart_trio import QuartTrio

from ..auth import Identity, bearer_token
from ..errors import BadRequest, NetraError, Unauthorized
from ..hub import Hub

def register_api(app: QuartTrio, hub: Hub) -> None:
    def identify() -> Identity:
        token = bearer_token([(b"authorization", request.headers.get("authorization", "").encode())])
        if not token:
            raise Unauthorized("missing bearer token")
        return hub.verifier.verify(token)

    @app.errorhandler(NetraError)
    async def netra_error(exc: NetraError) -> Any:
        return jsonify(code=exc.code, message=exc.message), exc.http_status

    @app.get("/api/threads")
    async def list_threads() -> Any:
        who = identify()
        try:
            limit = min(max(int(request.args.get("limit", 100)), 1), 500)
        except ValueError:
            raise BadRequest("'limit' must be a whole number") from None
        threads = await hub.store.list_threads(who.user_id, limit=limit)
        return jsonify(threads=[attrs.asdict(t) for t in threads])

    @app.get("/api/threads/<thread_id>")
    async def get_thread(thread_id: str) -> Any:
        who = identify()
        thread, messages, runs = await hub.store.get_thread(who.user_id, thread_id)
        return jsonify(
            thread=attrs.asdict(thread),
            messages=[attrs.asdict(m) for m in messages],
            runs=[attrs.asdict(r) for r in runs],
        )

    @app.delete("/api/threads/<thread_id>")
    async def delete_thread(thread_id: str) -> Any:
        who = identify()
        await hub.store.delete_thread(who.user_id, thread_id)
        return "", 204
