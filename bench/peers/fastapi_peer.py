"""A FastAPI + uvicorn server speaking the golden path of protocol v1, written
the way a competent FastAPI user would: one asyncio task per run, a lock so
``seq`` order is wire order, JWT from the ``Authorization`` header or a first
``auth`` frame.

It exists to give netra's figures a yardstick: the same scripted events
(``_script.py``), on the stack most Python teams would reach for. It has no
limits, store, rate limiting or heartbeats of its own, so netra being slower
than it measures what those features cost, and netra being faster measures
trio + hypercorn against asyncio + uvicorn.

    python bench/peers/fastapi_peer.py --host 127.0.0.1 --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import jwt
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import new_id, now_ms, script  # noqa: E402

SUBPROTOCOL = "netra.v1"
AUTH_TIMEOUT_S = 10.0


def _secret() -> str:
    return os.environ.get("NETRA_JWT_SECRET", "")


def _delay_s() -> float:
    return float(os.environ.get("NETRA_SCRIPTED_DELAY_MS", "0") or 0) / 1000.0


def _user_from(token: str) -> str | None:
    try:
        claims = jwt.decode(token, _secret(), algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else None


class Session:
    """One connection: its seq counter, its send lock and its running runs."""

    def __init__(self, ws: WebSocket, user_id: str) -> None:
        self.ws = ws
        self.user_id = user_id
        self.seq = 0
        self.lock = asyncio.Lock()
        self.runs: dict[str, asyncio.Task[None]] = {}

    async def emit(self, event: dict[str, Any]) -> None:
        async with self.lock:
            self.seq += 1
            frame = {"type": event.pop("type"), "seq": self.seq, "ts": now_ms(), **event}
            await self.ws.send_text(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))

    async def error(self, code: str, message: str, ref: Any = None) -> None:
        event: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if isinstance(ref, str):
            event["ref"] = ref
        await self.emit(event)

    async def run(self, text: str, run_id: str, thread_id: str, ref: str | None) -> None:
        try:
            for step in script(text, run_id=run_id, thread_id=thread_id, ref=ref, delay_s=_delay_s()):
                if isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    await self.emit(step)
        except asyncio.CancelledError:
            if self.runs.get(run_id) is not None:  # cancelled by the client, not by a disconnect
                await self.emit({"type": "agent_cancelled", "run_id": run_id,
                                 "thread_id": thread_id, "reason": "client"})
        finally:
            self.runs.pop(run_id, None)

    async def handle(self, raw: str) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            await self.error("bad_request", "frame is not valid JSON")
            return
        if not isinstance(msg, dict):
            await self.error("bad_request", "frame must be a JSON object")
            return
        ref = msg.get("id")
        kind = msg.get("type")
        if kind == "user_message":
            text = msg.get("text")
            if not isinstance(text, str) or not text.strip():
                await self.error("bad_request", "'user_message' needs a non-empty 'text'", ref)
                return
            run_id = new_id()
            thread_id = msg.get("thread_id") if isinstance(msg.get("thread_id"), str) else new_id()
            task = asyncio.create_task(self.run(text, run_id, thread_id, ref if isinstance(ref, str) else None))
            self.runs[run_id] = task
        elif kind == "ping":
            await self.emit({"type": "pong", "id": ref})
        elif kind == "cancel":
            task = self.runs.get(msg.get("run_id"))
            if task is None:
                await self.error("not_found", "no such run", ref)
            else:
                task.cancel()
        elif kind == "auth":
            if _user_from(str(msg.get("token", ""))) != self.user_id:
                await self.ws.close(code=4401)
        else:
            await self.error("unknown_type", f"unknown message type {str(kind)[:40]!r}", ref)


app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@app.websocket("/ws")
async def ws_endpoint(websocket: WebSocket) -> None:
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    header = websocket.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        user_id = _user_from(token.strip()) if scheme.lower() == "bearer" else None
    else:
        try:
            first = json.loads(await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_S))
        except (TimeoutError, ValueError):
            await websocket.close(code=4408)
            return
        except WebSocketDisconnect:
            return
        ok = isinstance(first, dict) and first.get("type") == "auth"
        user_id = _user_from(str(first.get("token", ""))) if ok else None
    if user_id is None:
        await websocket.close(code=4401)
        return
    session = Session(websocket, user_id)
    await session.emit({"type": "connected", "connection_id": new_id(), "user_id": user_id,
                        "limits": {}, "server_version": "fastapi-peer", "protocol": SUBPROTOCOL})
    try:
        while True:
            await session.handle(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
    finally:
        tasks = list(session.runs.values())
        session.runs.clear()
        for task in tasks:
            task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                backlog=2048)


if __name__ == "__main__":
    main()
