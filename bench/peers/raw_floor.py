"""netra's floor: the least a trio + hypercorn server can do to speak the
golden path of protocol v1. A raw ASGI app (no framework), served by
hypercorn's trio worker, running the same scripted events as netra
(``_script.py``) with trio; it decodes the JWT and nothing more: no limits,
no store, no rate limiting, no heartbeats, no outbox.

netra runs on the same stack, so netra / floor is what netra's own features
(auth rules, limits, outbox, supervision, metrics, store) cost per run.

    python bench/peers/raw_floor.py --host 127.0.0.1 --port 8102
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import jwt
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import new_id, now_ms, script  # noqa: E402

SUBPROTOCOL = "netra.v1"
SECRET = os.environ.get("NETRA_JWT_SECRET", "")
DELAY_S = float(os.environ.get("NETRA_SCRIPTED_DELAY_MS", "0") or 0) / 1000.0


def _user_from(token: str) -> str | None:
    try:
        sub = jwt.decode(token, SECRET, algorithms=["HS256"]).get("sub")
    except jwt.PyJWTError:
        return None
    return sub if isinstance(sub, str) and sub else None


async def _http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    ok = scope.get("path") == "/healthz"
    body = b'{"ok":true}' if ok else b'{"error":"not found"}'
    await send({"type": "http.response.start", "status": 200 if ok else 404,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    headers = dict(scope.get("headers") or [])
    offered = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None})
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth:
        user_id = _user_from(auth.partition(" ")[2].strip())
    else:
        first = await receive()
        try:
            msg = json.loads(first.get("text") or "")
            user_id = _user_from(str(msg.get("token", ""))) if msg.get("type") == "auth" else None
        except (ValueError, AttributeError):
            user_id = None
    if user_id is None:
        await send({"type": "websocket.close", "code": 4401})
        return

    seq = 0
    lock = trio.StrictFIFOLock()  # seq order must be wire order
    runs: dict[str, trio.CancelScope] = {}

    async def emit(event: dict[str, Any]) -> None:
        nonlocal seq
        async with lock:
            seq += 1
            frame = {"type": event.pop("type"), "seq": seq, "ts": now_ms(), **event}
            text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
            await send({"type": "websocket.send", "text": text})

    async def run(text: str, run_id: str, thread_id: str, ref: str | None) -> None:
        with runs.setdefault(run_id, trio.CancelScope()) as cs:
            for step in script(text, run_id=run_id, thread_id=thread_id, ref=ref, delay_s=DELAY_S):
                if isinstance(step, float):
                    await trio.sleep(step)
                else:
                    await emit(step)
        runs.pop(run_id, None)
        if cs.cancelled_caught:
            await emit({"type": "agent_cancelled", "run_id": run_id, "thread_id": thread_id, "reason": "client"})

    await emit({"type": "connected", "connection_id": new_id(), "user_id": user_id, "limits": {},
                "server_version": "raw-floor", "protocol": SUBPROTOCOL})
    async with trio.open_nursery() as nursery:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                break
            try:
                msg = json.loads(message.get("text") or "")
                kind, ref = msg.get("type"), msg.get("id")
            except (ValueError, AttributeError):
                await emit({"type": "error", "code": "bad_request", "message": "not a JSON object"})
                continue
            ref = ref if isinstance(ref, str) else None
            if kind == "user_message" and isinstance(msg.get("text"), str):
                thread_id = msg.get("thread_id") if isinstance(msg.get("thread_id"), str) else new_id()
                nursery.start_soon(run, msg["text"], new_id(), thread_id, ref)
            elif kind == "ping":
                await emit({"type": "pong", "id": ref})
            elif kind == "cancel" and msg.get("run_id") in runs:
                runs[msg["run_id"]].cancel()
            elif kind != "auth":
                await emit({"type": "error", "code": "bad_request", "message": "not supported", "ref": ref})
        nursery.cancel_scope.cancel()  # the client went away: its runs end silently


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.backlog = 2048
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    trio.run(lambda: serve(app, config, shutdown_trigger=_until_signal))


if __name__ == "__main__":
    main()
