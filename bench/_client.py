"""One simulated chat user, and the checks it makes on every event it gets.

A user owns one connection (its own JWT, ``Authorization`` header,
subprotocol ``netra.v1``) and sends its messages one at a time: each waits
for the run's terminal event before the next, the way a person in a chat
does. Every frame is checked against protocol v1 as it arrives, so the
figures of a run that broke the contract never count as a success:

- ``seq`` is +1 per event on the connection, starting at 1, no gaps;
- a run's events include agent_started, agent_thinking, tool_executing,
  tool_completed and agent_completed, in that order, with every
  ``tool_call_id`` answered and nothing after the terminal event;
- ``agent_completed.text`` equals the concatenated ``text_delta`` deltas;
- ``tool_executing.args`` are the arguments this user sent;
- every run-scoped event belongs to a run this user started: one that does
  not is a cross-user event (the target is 0).
"""

from __future__ import annotations

import json
import uuid
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import jwt
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

SUBPROTOCOL = "netra.v1"
FIVE = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")
TERMINAL = frozenset({"agent_completed", "agent_error", "agent_cancelled"})


@dataclass
class Tally:
    """What one worker process measured; tallies of several workers add up."""

    users: int = 0
    connected: int = 0
    connect_failures: int = 0
    runs_attempted: int = 0
    runs_sent: int = 0
    runs_succeeded: int = 0
    runs_five_in_order: int = 0
    cross_user_events: int = 0
    seq_errors: int = 0
    text_mismatches: int = 0
    args_mismatches: int = 0
    tool_pairing_errors: int = 0
    events_after_terminal: int = 0
    run_timeouts: int = 0
    disconnects: int = 0
    events_received: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[str] = field(default_factory=Counter)
    ttfe_ms: list[float] = field(default_factory=list)
    ttc_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["errors"], out["close_codes"] = dict(self.errors), dict(self.close_codes)
        return out

    def add(self, other: dict[str, Any]) -> None:
        for key, value in other.items():
            mine = getattr(self, key)
            if isinstance(mine, Counter):
                mine.update(value)
            elif isinstance(mine, list):
                mine.extend(value)
            else:
                setattr(self, key, mine + value)


def mint_token(secret: str, sub: str, ttl_s: float = 3600.0) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + int(ttl_s)}, secret, algorithm="HS256")


def message_for(user_no: int, k: int) -> tuple[str, dict[str, str]]:
    """A message calling the calculator, with arguments unique to (user,
    message) so a tool call echoed to the wrong user is also caught."""
    args = {"expression": f"{user_no}*{k + 1}"}
    return f"what is [[tool:calculator {json.dumps(args)}]]", args


def _five_in_order(types: list[str]) -> bool:
    i = 0
    for t in types:
        if i < len(FIVE) and t == FIVE[i]:
            i += 1
    return i == len(FIVE)


@dataclass
class User:
    """One user's connection and the bookkeeping its checks need."""

    sub: str
    user_no: int
    tally: Tally
    ws: WebSocketConnection | None = None
    last_seq: int = 0
    my_runs: set[str] = field(default_factory=set)
    finished_at: float = 0.0
    #: Makes message ids unique per scenario run: netra treats a repeated id
    #: on the same user as an idempotent retry and starts no second run.
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    async def connect(self, nursery: trio.Nursery, url: str, token: str, timeout_s: float) -> bool:
        headers = [(b"authorization", f"Bearer {token}".encode())]
        try:
            with trio.fail_after(timeout_s):
                ws = await connect_websocket_url(nursery, url, subprotocols=[SUBPROTOCOL], extra_headers=headers)
                first = json.loads(await ws.get_message())
        except Exception as exc:  # noqa: BLE001 - any failure to connect is counted, by kind
            self.tally.connect_failures += 1
            self.tally.errors[f"connect:{type(exc).__name__}"] += 1
            if isinstance(exc, ConnectionClosed):  # e.g. 4401: the server refused the token
                self.tally.close_codes[str(getattr(exc.reason, "code", None))] += 1
            return False
        self.ws = ws
        if ws.subprotocol != SUBPROTOCOL:
            self.tally.errors["subprotocol_not_selected"] += 1
        self._check_seq(first)
        if first.get("type") != "connected":
            self.tally.errors["first_frame_not_connected"] += 1
        elif first.get("user_id") not in (None, self.sub):
            self.tally.cross_user_events += 1  # the server thinks we are someone else
        self.tally.connected += 1
        return True

    def _check_seq(self, event: dict[str, Any]) -> bool:
        self.tally.events_received += 1
        seq = event.get("seq")
        ok = seq == self.last_seq + 1
        if not ok:
            self.tally.seq_errors += 1
        self.last_seq = seq if isinstance(seq, int) else self.last_seq + 1
        return ok

    async def run_messages(self, messages: int, run_timeout_s: float) -> None:
        """Send ``messages`` messages one after another; stop at the first
        broken connection or timed-out run (later messages count as failed)."""
        assert self.ws is not None
        try:
            for k in range(messages):
                text, args = message_for(self.user_no, k)
                if not await self._one_run(f"{self.sub}-{self.nonce}-m{k}", text, args, run_timeout_s):
                    break
        except ConnectionClosed as exc:
            self.tally.disconnects += 1
            self.tally.close_codes[str(getattr(exc.reason, "code", None))] += 1
        self.finished_at = time.monotonic()

    async def _one_run(self, mid: str, text: str, args: dict[str, str], timeout_s: float) -> bool:
        """One run; returns False when the user should stop (timeout)."""
        ws = self.ws
        assert ws is not None
        tally = self.tally
        run_id: str | None = None
        types: list[str] = []
        deltas: list[str] = []
        open_calls: set[str] = set()
        ok = True
        t_first: float | None = None
        terminal: dict[str, Any] | None = None
        t0 = time.perf_counter()
        await ws.send_message(json.dumps({"type": "user_message", "id": mid, "text": text}))
        tally.runs_sent += 1
        with trio.move_on_after(timeout_s) as scope:
            while terminal is None:
                event = json.loads(await ws.get_message())
                ok = self._check_seq(event) and ok
                kind = event.get("type")
                rid = event.get("run_id")
                if kind == "error":  # may carry a run_id (run_in_progress): it is still not a run event
                    tally.errors[str(event.get("code"))] += 1
                    if event.get("ref") == mid:
                        terminal = event  # refused: no run was started
                    continue
                if rid is None:
                    continue  # pong and other connection-scoped events
                if rid != run_id:
                    if rid in self.my_runs:
                        tally.events_after_terminal += 1
                        continue
                    adopt = run_id is None and kind in ("run_queued", "agent_started")
                    if not adopt or event.get("ref") not in (None, mid):
                        tally.cross_user_events += 1
                        continue
                    run_id = rid
                    self.my_runs.add(rid)
                if t_first is None:
                    t_first = time.perf_counter()
                types.append(kind)
                if kind == "text_delta":
                    deltas.append(str(event.get("delta", "")))
                elif kind == "tool_executing":
                    open_calls.add(event.get("tool_call_id"))
                    if event.get("args") != args:
                        tally.args_mismatches += 1
                        ok = False
                elif kind == "tool_completed":
                    if event.get("tool_call_id") not in open_calls:
                        tally.tool_pairing_errors += 1
                        ok = False
                    open_calls.discard(event.get("tool_call_id"))
                elif kind in TERMINAL:
                    terminal = event
        t_end = time.perf_counter()
        if scope.cancelled_caught:
            tally.run_timeouts += 1
            return False
        if t_first is not None:
            tally.ttfe_ms.append((t_first - t0) * 1000)
        five = _five_in_order(types)
        tally.runs_five_in_order += five
        if terminal.get("type") != "agent_completed":
            if terminal.get("type") != "error":
                tally.errors[f"{terminal.get('type')}:{terminal.get('code') or terminal.get('reason')}"] += 1
            return True
        if terminal.get("text") != "".join(deltas):
            tally.text_mismatches += 1
            ok = False
        if open_calls:
            tally.tool_pairing_errors += 1
            ok = False
        if ok and five:
            tally.runs_succeeded += 1
            tally.ttc_ms.append((t_end - t0) * 1000)
        return True
