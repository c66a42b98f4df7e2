"""The wire protocol as pure functions: no socket needed to check the contract."""

from __future__ import annotations

import json
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netra import errors, protocol
from netra.errors import BadRequest, TooLarge, UnknownType
from netra.protocol import (
    AgentCompleted,
    ApprovalRequired,
    Pong,
    ToolCompleted,
    decode_event,
    encode_event,
    error_event,
    parse_client_message,
)


def test_wire_names_are_permanent():
    assert set(typing.get_args(protocol.EventType)) == {
        "connected", "run_queued", "agent_started", "agent_thinking", "tool_executing",
        "tool_completed", "text_delta", "agent_completed", "agent_error", "agent_cancelled",
        "error", "pong", "resumed", "resync_required", "approval_required",
    }
    assert set(typing.get_args(protocol.CancelReason)) == {
        "client", "interrupted", "disconnect", "shutdown", "timeout",
    }
    assert set(typing.get_args(errors.ErrorCode)) == {
        "bad_request", "unknown_type", "too_large", "unauthorized", "forbidden", "not_found",
        "rate_limited", "busy", "run_in_progress", "timeout", "tool_error", "llm_error",
        "store_error", "internal",
    }
    assert protocol.SUBPROTOCOL == "netra.v1"
    codes = [errors.CLOSE_NORMAL, errors.CLOSE_GOING_AWAY, errors.CLOSE_INVALID_UTF8, errors.CLOSE_TOO_LARGE,
             errors.CLOSE_INTERNAL, errors.CLOSE_PROTOCOL_ABUSE, errors.CLOSE_UNAUTHORIZED,
             errors.CLOSE_AUTH_TIMEOUT, errors.CLOSE_TOO_MANY, errors.CLOSE_SLOW_CONSUMER]
    assert codes == [1000, 1001, 1007, 1009, 1011, 4400, 4401, 4408, 4429, 4430]


def test_every_event_class_has_its_wire_type():
    for name in typing.get_args(protocol.EventType):
        assert name in protocol._EVENT_CLASSES


def test_parse_user_message():
    msg = parse_client_message(json.dumps(
        {"type": "user_message", "text": "hi", "thread_id": "t1", "agent": "a", "id": "m1", "multitask": "reject"}
    ))
    assert msg == protocol.UserMessage(text="hi", thread_id="t1", agent="a", id="m1", multitask="reject")


@pytest.mark.parametrize(
    ("frame", "error", "ref"),
    [
        ("{nope", BadRequest, None),
        ("[1, 2]", BadRequest, None),
        (b'{"type": "ping"}', BadRequest, None),
        ('{"id": "x"}', BadRequest, "x"),
        ('{"type": "fly", "id": "y"}', UnknownType, "y"),
        ('{"type": "user_message", "id": "z"}', BadRequest, "z"),
        ('{"type": "user_message", "text": "   "}', BadRequest, None),
        ('{"type": "user_message", "text": "a", "multitask": "later"}', BadRequest, None),
        ('{"type": "user_message", "text": "a", "thread_id": 5}', BadRequest, None),
        ('{"type": "cancel"}', BadRequest, None),
        ('{"type": "auth"}', BadRequest, None),
        ('{"type": "user_message", "text": "' + "x" * 40 + '"}', TooLarge, None),
    ],
)
def test_malformed_frames_get_a_clear_error(frame, error, ref):
    with pytest.raises(error) as caught:
        parse_client_message(frame, max_text_chars=32)
    event = error_event(caught.value)
    assert event.code == error.code and event.message and event.ref == ref


def test_oversized_frame_is_refused_before_parsing():
    with pytest.raises(TooLarge):
        parse_client_message('{"type": "ping", "id": "' + "x" * 100 + '"}', max_bytes=50)


def test_encode_envelope_and_roundtrip():
    event = AgentCompleted(run_id="r", thread_id="t", message_id="m", text="hi", usage={"x": 1}, duration_ms=3)
    text = encode_event(event, seq=7, ts=1_700_000_000_000)
    raw = json.loads(text)
    assert raw["type"] == "agent_completed" and raw["seq"] == 7 and raw["ts"] == 1_700_000_000_000
    assert "agent" not in raw  # optional fields that are None stay off the wire
    assert decode_event(text).event == event


def test_tool_completed_carries_exactly_one_of_result_or_error():
    ok = json.loads(encode_event(ToolCompleted(run_id="r", thread_id="t", tool_call_id="c", tool="x",
                                               duration_ms=1, result=None), seq=1, ts=0))
    assert "result" in ok and ok["result"] is None and "error" not in ok
    bad = json.loads(encode_event(ToolCompleted(run_id="r", thread_id="t", tool_call_id="c", tool="x",
                                                duration_ms=1, error="boom"), seq=1, ts=0))
    assert bad["error"] == "boom" and "result" not in bad


def test_pong_always_has_an_id():
    assert json.loads(encode_event(Pong(), seq=1, ts=0))["id"] is None


def test_unknown_events_decode_without_failing():
    received = decode_event('{"type": "from_the_future", "seq": 3, "ts": 1, "x": 1}')
    assert received.event is None and received.type == "from_the_future" and received.seq == 3


# -- tool approval ---------------------------------------------------------------


def test_parse_tool_decision():
    approve = parse_client_message(json.dumps({
        "type": "tool_decision", "run_id": "r", "tool_call_id": "c", "decision": "approve",
        "args": {"amount": 3}, "id": "d-1",
    }))
    assert approve == protocol.ToolDecision(run_id="r", tool_call_id="c", decision="approve", args={"amount": 3}, id="d-1")
    deny = parse_client_message(json.dumps({
        "type": "tool_decision", "run_id": "r", "tool_call_id": "c", "decision": "deny", "reason": "  not now "
    }))
    assert (deny.decision, deny.args, deny.reason) == ("deny", None, "not now")
    blank = parse_client_message(json.dumps({
        "type": "tool_decision", "run_id": "r", "tool_call_id": "c", "decision": "deny", "reason": " "
    }))
    assert blank.reason is None


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tool_call_id": "c", "decision": "approve"},
        {"run_id": "r", "decision": "approve"},
        {"run_id": "r", "tool_call_id": "c"},
        {"run_id": "r", "tool_call_id": "c", "decision": "yes"},
        {"run_id": "r", "tool_call_id": "c", "decision": "approve", "args": [1]},
        {"run_id": "r", "tool_call_id": "c", "decision": "deny", "args": {"a": 1}},
        {"run_id": "r", "tool_call_id": "c", "decision": "deny", "reason": 5},
        {"run_id": "r", "tool_call_id": "c", "decision": "deny", "reason": "x" * 1001},
        {"run_id": "", "tool_call_id": "c", "decision": "deny"},
        {"run_id": "r", "tool_call_id": "c" * 129, "decision": "deny"},
    ],
)
def test_malformed_tool_decisions_are_bad_requests(fields):
    with pytest.raises(BadRequest) as caught:
        parse_client_message(json.dumps({"type": "tool_decision", "id": "d", **fields}))
    event = error_event(caught.value)
    assert event.code == "bad_request" and event.ref == "d" and event.message


def test_approval_required_encodes_and_decodes():
    event = ApprovalRequired(run_id="r", thread_id="t", tool_call_id="c", tool="transfer",
                             args={"amount": 3}, expires_at_ms=1_700_000_300_000)
    raw = json.loads(encode_event(event, seq=4, ts=1_700_000_000_000))
    assert raw == {"type": "approval_required", "seq": 4, "ts": 1_700_000_000_000, "run_id": "r",
                   "thread_id": "t", "tool_call_id": "c", "tool": "transfer", "args": {"amount": 3},
                   "expires_at_ms": 1_700_000_300_000}
    assert decode_event(json.dumps(raw)).event == event


_json_values = st.recursive(
    # finite: json.dumps writes inf as Infinity, a frame that is not JSON at all (tested elsewhere)
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
_ids = st.text(min_size=1, max_size=130)
_decision_fields = {
    "run_id": _ids | _json_values,
    "tool_call_id": _ids | _json_values,
    "decision": st.sampled_from(["approve", "deny", "Approve", "", None, 1]),
    "args": st.dictionaries(st.text(max_size=8), _json_values, max_size=3) | _json_values,
    "reason": st.text(max_size=1100) | _json_values,
    "id": _ids | _json_values,
}
_decisions = st.fixed_dictionaries({"type": st.just("tool_decision")}, optional=_decision_fields)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_decisions)
def test_a_tool_decision_parses_to_exactly_what_was_sent_or_is_a_bad_request(obj):
    """Any object of type tool_decision is either a ToolDecision carrying
    exactly the valid fields sent, or a bad_request that points at the
    message's id when it had a readable one; never anything else."""
    frame = json.dumps(obj)
    valid_id = lambda v: isinstance(v, str) and 0 < len(v) <= 128  # noqa: E731
    try:
        msg = parse_client_message(frame)
    except errors.NetraError as exc:
        assert exc.code == "bad_request"
        ref = error_event(exc).ref
        assert ref == (obj["id"] if valid_id(obj.get("id")) else None)
        return
    assert isinstance(msg, protocol.ToolDecision)
    assert valid_id(obj["run_id"]) and msg.run_id == obj["run_id"]
    assert valid_id(obj["tool_call_id"]) and msg.tool_call_id == obj["tool_call_id"]
    assert msg.decision == obj["decision"] in ("approve", "deny")
    assert msg.id == obj.get("id")
    if msg.decision == "deny":
        assert msg.args is None and obj.get("args") is None
    else:
        assert msg.args == obj.get("args") and (msg.args is None or isinstance(msg.args, dict))
    reason = obj.get("reason")
    assert msg.reason == ((reason.strip() or None) if reason is not None else None)
    assert msg.reason is None or 0 < len(msg.reason) <= 1000
