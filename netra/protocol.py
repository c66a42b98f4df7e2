"""netra wire protocol v1, as pure functions: text in, typed message out;
typed event in, text out. No I/O happens here, so every rule of the contract
can be tested without a socket.

Wire names are ``Literal`` values and permanent: renaming one breaks clients
nobody on the team wrote. ``ts`` is server time in integer epoch milliseconds.
"""

from __future__ import annotations

import json
import operator
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal

import attrs
import orjson

from . import _json
from .errors import BadRequest, TooLarge, UnknownType

SUBPROTOCOL: Final = "netra.v1"

Multitask = Literal["reject", "enqueue", "interrupt"]
CancelReason = Literal["client", "interrupted", "disconnect", "shutdown", "timeout"]
Decision = Literal["approve", "deny"]

_MULTITASK: Final = ("reject", "enqueue", "interrupt")
_MAX_ID_CHARS: Final = 128
#: Longest ``reason`` of a tool_decision: a sentence for the model, not a document.
_MAX_REASON_CHARS: Final = 1000


# --------------------------------------------------------------------------
# client -> server


@attrs.frozen(kw_only=True)
class Auth:
    type: ClassVar[Literal["auth"]] = "auth"
    token: str = attrs.field(repr=False)
    id: str | None = None


@attrs.frozen(kw_only=True)
class UserMessage:
    type: ClassVar[Literal["user_message"]] = "user_message"
    text: str
    thread_id: str | None = None
    agent: str | None = None
    id: str | None = None
    multitask: Multitask | None = None


@attrs.frozen(kw_only=True)
class Cancel:
    type: ClassVar[Literal["cancel"]] = "cancel"
    run_id: str | None = None
    thread_id: str | None = None
    id: str | None = None


@attrs.frozen(kw_only=True)
class Ping:
    type: ClassVar[Literal["ping"]] = "ping"
    id: str | None = None


@attrs.frozen(kw_only=True)
class Resume:
    """Take a dropped session over on this connection (first, after auth)."""

    type: ClassVar[Literal["resume"]] = "resume"
    session_id: str
    resume_token: str = attrs.field(repr=False)
    last_seq: int
    id: str | None = None


@attrs.frozen(kw_only=True)
class ToolDecision:
    """The user's answer to an ``approval_required``: run the call (with
    ``args`` in place of the model's, when given) or refuse it."""

    type: ClassVar[Literal["tool_decision"]] = "tool_decision"
    run_id: str
    tool_call_id: str
    decision: Decision
    args: dict[str, Any] | None = None
    reason: str | None = None
    id: str | None = None


ClientMessage = Auth | UserMessage | Cancel | Ping | Resume | ToolDecision


def _opt_str(obj: dict[str, Any], key: str, *, ref: str | None, limit: int = _MAX_ID_CHARS) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadRequest(f"'{key}' must be a non-empty string of at most {limit} characters", ref=ref)
    return value


def parse_client_message(
    data: str | bytes, *, max_bytes: int = 65536, max_text_chars: int = 32000
) -> ClientMessage:
    """Parse one client frame. Raises a NetraError whose ``extra['ref']`` is the
    client's ``id`` when it could be read, so the answer can point at it."""
    if isinstance(data, bytes):
        raise BadRequest("frames must be JSON text, not binary")
    if len(data) > max_bytes:  # characters <= bytes; the server also bounds bytes
        raise TooLarge(f"frame larger than {max_bytes} bytes")
    try:
        obj = orjson.loads(data)  # strict JSON: NaN and Infinity are refused too
    except orjson.JSONDecodeError:
        raise BadRequest("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("frame must be a JSON object")
    raw_id = obj.get("id")
    ref = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= _MAX_ID_CHARS else None
    msg_id = _opt_str(obj, "id", ref=ref)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadRequest("frame has no 'type'", ref=ref)
    match kind:
        case "auth":
            token = obj.get("token")
            if not isinstance(token, str) or not token:
                raise BadRequest("'auth' needs a 'token' string", ref=ref)
            return Auth(token=token, id=msg_id)
        case "user_message":
            text = obj.get("text")
            if not isinstance(text, str) or not text.strip():
                raise BadRequest("'user_message' needs a non-empty 'text' string", ref=ref)
            if len(text) > max_text_chars:
                raise TooLarge(f"'text' is longer than {max_text_chars} characters", ref=ref)
            multitask = obj.get("multitask")
            if multitask is not None and multitask not in _MULTITASK:
                raise BadRequest("'multitask' must be reject, enqueue or interrupt", ref=ref)
            return UserMessage(
                text=text,
                thread_id=_opt_str(obj, "thread_id", ref=ref),
                agent=_opt_str(obj, "agent", ref=ref),
                id=msg_id,
                multitask=multitask,
            )
        case "cancel":
            run_id = _opt_str(obj, "run_id", ref=ref)
            thread_id = _opt_str(obj, "thread_id", ref=ref)
            if run_id is None and thread_id is None:
                raise BadRequest("'cancel' needs 'run_id' or 'thread_id'", ref=ref)
            return Cancel(run_id=run_id, thread_id=thread_id, id=msg_id)
        case "ping":
            return Ping(id=msg_id)
        case "resume":
            session_id = _opt_str(obj, "session_id", ref=ref)
            token = _opt_str(obj, "resume_token", ref=ref)
            last_seq = obj.get("last_seq")
            if session_id is None or token is None:
                raise BadRequest("'resume' needs 'session_id' and 'resume_token' strings", ref=ref)
            if type(last_seq) is not int or not 0 <= last_seq < 1 << 53:
                raise BadRequest("'resume' needs 'last_seq', a whole number from 0", ref=ref)
            return Resume(session_id=session_id, resume_token=token, last_seq=last_seq, id=msg_id)
        case "tool_decision":
            return _tool_decision(obj, msg_id, ref)
        case _:
            raise UnknownType(f"unknown message type {kind[:40]!r}", ref=ref)


def _tool_decision(obj: dict[str, Any], msg_id: str | None, ref: str | None) -> ToolDecision:
    run_id = _opt_str(obj, "run_id", ref=ref)
    tool_call_id = _opt_str(obj, "tool_call_id", ref=ref)
    if run_id is None or tool_call_id is None:
        raise BadRequest("'tool_decision' needs 'run_id' and 'tool_call_id' strings", ref=ref)
    decision = obj.get("decision")
    if decision not in ("approve", "deny"):
        raise BadRequest("'decision' must be approve or deny", ref=ref)
    args = obj.get("args")
    if args is not None:
        if not isinstance(args, dict):
            raise BadRequest("'args' must be a JSON object of the tool's arguments", ref=ref)
        if decision == "deny":
            raise BadRequest("'args' goes with approve only: a denied call does not run", ref=ref)
    reason = obj.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON_CHARS):
        raise BadRequest(f"'reason' must be a string of at most {_MAX_REASON_CHARS} characters", ref=ref)
    return ToolDecision(
        run_id=run_id, tool_call_id=tool_call_id, decision=decision, args=args,
        reason=(reason.strip() or None) if reason is not None else None, id=msg_id,
    )


# --------------------------------------------------------------------------
# server -> client

EventType = Literal[
    "connected",
    "run_queued",
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "text_delta",
    "agent_completed",
    "agent_error",
    "agent_cancelled",
    "error",
    "pong",
    "resumed",
    "resync_required",
    "approval_required",
]

#: The events that end a run. Exactly one per run, and nothing after it.
TERMINAL: Final = frozenset({"agent_completed", "agent_error", "agent_cancelled"})


@attrs.frozen(kw_only=True)
class Connected:
    type: ClassVar[Literal["connected"]] = "connected"
    connection_id: str
    user_id: str
    #: The session a dropped connection can resume (with ``resume_token``).
    session_id: str | None = None
    resume_token: str | None = None
    limits: dict[str, Any]
    server_version: str
    protocol: str = SUBPROTOCOL


@attrs.frozen(kw_only=True)
class RunEvent:
    """Base of every run-scoped event: all carry ``run_id`` and ``thread_id``."""

    type: ClassVar[str]
    run_id: str
    thread_id: str


@attrs.frozen(kw_only=True)
class RunQueued(RunEvent):
    type: ClassVar[Literal["run_queued"]] = "run_queued"
    position: int
    ref: str | None = None


@attrs.frozen(kw_only=True)
class AgentStarted(RunEvent):
    type: ClassVar[Literal["agent_started"]] = "agent_started"
    agent: str
    message_id: str
    ref: str | None = None


@attrs.frozen(kw_only=True)
class AgentThinking(RunEvent):
    type: ClassVar[Literal["agent_thinking"]] = "agent_thinking"
    agent: str
    text: str
    step: int


@attrs.frozen(kw_only=True)
class ToolExecuting(RunEvent):
    type: ClassVar[Literal["tool_executing"]] = "tool_executing"
    tool_call_id: str
    tool: str
    args: dict[str, Any]


@attrs.frozen(kw_only=True)
class ToolCompleted(RunEvent):
    type: ClassVar[Literal["tool_completed"]] = "tool_completed"
    tool_call_id: str
    tool: str
    duration_ms: int
    result: Any = None
    error: str | None = None

    def fields(self) -> dict[str, Any]:
        out = {
            "run_id": self.run_id, "thread_id": self.thread_id, "tool_call_id": self.tool_call_id,
            "tool": self.tool, "duration_ms": self.duration_ms,
        }
        # exactly one of result / error is on the wire
        if self.error is None:
            out["result"] = self.result
        else:
            out["error"] = self.error
        return out


@attrs.frozen(kw_only=True)
class ApprovalRequired(RunEvent):
    """The run waits for the user to approve (or deny) this tool call, until
    ``expires_at_ms`` (epoch ms); then it is denied with reason ``timeout``.
    Its ``tool_executing`` comes after the decision, with the arguments the
    call runs with."""

    type: ClassVar[Literal["approval_required"]] = "approval_required"
    tool_call_id: str
    tool: str
    args: dict[str, Any]
    expires_at_ms: int


@attrs.frozen(kw_only=True)
class TextDelta(RunEvent):
    type: ClassVar[Literal["text_delta"]] = "text_delta"
    message_id: str
    delta: str


@attrs.frozen(kw_only=True)
class AgentCompleted(RunEvent):
    type: ClassVar[Literal["agent_completed"]] = "agent_completed"
    message_id: str
    text: str
    usage: dict[str, int]
    duration_ms: int
    agent: str | None = None


@attrs.frozen(kw_only=True)
class AgentError(RunEvent):
    type: ClassVar[Literal["agent_error"]] = "agent_error"
    code: str
    message: str
    retryable: bool


@attrs.frozen(kw_only=True)
class AgentCancelled(RunEvent):
    type: ClassVar[Literal["agent_cancelled"]] = "agent_cancelled"
    reason: CancelReason


@attrs.frozen(kw_only=True)
class Error:
    type: ClassVar[Literal["error"]] = "error"
    code: str
    message: str
    ref: str | None = None
    retry_after_ms: int | None = None
    run_id: str | None = None
    thread_id: str | None = None


@attrs.frozen(kw_only=True)
class Pong:
    type: ClassVar[Literal["pong"]] = "pong"
    id: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"id": self.id}  # always present, null when the ping had none


@attrs.frozen(kw_only=True)
class Resumed:
    """The session is back on this connection. Its ``seq`` repeats the
    client's ``last_seq`` (it does not advance the numbering); the events
    after it follow, then live ones."""

    type: ClassVar[Literal["resumed"]] = "resumed"
    session_id: str
    last_seq: int
    replayed: int


@attrs.frozen(kw_only=True)
class ResyncRequired:
    """The session is back, but the events after ``last_seq`` are no longer
    kept: read the threads back over HTTP. Its ``seq`` is the session's
    latest; live events follow from the next one."""

    type: ClassVar[Literal["resync_required"]] = "resync_required"
    session_id: str
    last_seq: int


Event = (
    Connected
    | RunQueued
    | AgentStarted
    | AgentThinking
    | ToolExecuting
    | ToolCompleted
    | ApprovalRequired
    | TextDelta
    | AgentCompleted
    | AgentError
    | AgentCancelled
    | Error
    | Pong
    | Resumed
    | ResyncRequired
)


def event_fields(event: Event) -> dict[str, Any]:
    """The event's own fields, without None-valued optional ones."""
    custom = getattr(event, "fields", None)
    if custom is not None:
        return custom()
    out = {}
    for name in _FIELD_NAMES[type(event)]:
        value = getattr(event, name)
        if value is not None:
            out[name] = value
    return out


def encode_event(event: Event, *, seq: int, ts: int) -> bytes:
    """Serialise one event, with its per-session ``seq`` and ``ts`` (epoch
    ms), to the UTF-8 JSON of a text frame."""
    obj = {"type": event.type, "seq": seq, "ts": ts}
    plan = _ENCODING.get(type(event))
    if plan is None:  # a class with its own fields(), or not one of ours
        obj.update(event_fields(event))
    else:
        names, values = plan[0], plan[1](event)
        if None in values:
            for name, value in zip(names, values):
                if value is not None:
                    obj[name] = value
        else:
            obj.update(zip(names, values))
    return _json.dumps(obj)


def error_event(exc: Exception, *, ref: str | None = None) -> Error:
    """The ``error`` event answering a refused client message."""
    from .errors import NetraError

    if not isinstance(exc, NetraError):
        return Error(code="internal", message="internal error", ref=ref)
    extra = dict(exc.extra)
    ref = extra.pop("ref", None) or ref
    return Error(
        code=exc.code,
        message=exc.message,
        ref=ref,
        retry_after_ms=extra.get("retry_after_ms"),
        run_id=extra.get("run_id"),
        thread_id=extra.get("thread_id"),
    )


_EVENT_CLASSES: Final[dict[str, type]] = {
    cls.type: cls
    for cls in (
        Connected, RunQueued, AgentStarted, AgentThinking, ToolExecuting, ToolCompleted, ApprovalRequired,
        TextDelta, AgentCompleted, AgentError, AgentCancelled, Error, Pong, Resumed, ResyncRequired,
    )
}


#: Field names per event class, in wire order (encoding reads these, not attrs.asdict).
_FIELD_NAMES: Final = MappingProxyType(
    {cls: tuple(f.name for f in attrs.fields(cls)) for cls in _EVENT_CLASSES.values()}
)


#: How encode_event reads each event class without a fields() of its own:
#: its field names, and one getter for all their values (a tuple).
_ENCODING: Final = MappingProxyType({
    cls: (names, operator.attrgetter(*names) if len(names) > 1 else (lambda e, n=names[0]: (getattr(e, n),)))
    for cls, names in _FIELD_NAMES.items()
    if names and getattr(cls, "fields", None) is None
})


@attrs.frozen(kw_only=True)
class Received:
    """A decoded server event with its envelope (``seq``, ``ts``) and the raw object."""

    event: Event | None  # None for an event type this client does not know
    seq: int
    ts: int
    raw: dict[str, Any]

    @property
    def type(self) -> str:
        return self.raw.get("type", "")


def decode_event(text: str | bytes) -> Received:
    """Parse one server frame (the client side of :func:`encode_event`).
    Unknown fields are ignored and unknown types give ``event=None``, so a
    client keeps working when the server adds to the protocol."""
    raw = json.loads(text)
    cls = _EVENT_CLASSES.get(raw.get("type"))
    event = None
    if cls is not None:
        names = {f.name for f in attrs.fields(cls)}
        event = cls(**{k: v for k, v in raw.items() if k in names})
    return Received(event=event, seq=raw.get("seq", 0), ts=raw.get("ts", 0), raw=raw)
