"""Whatever a client sends gets a clear, documented answer and nothing else:
an event, an `error` with a code, or a close code of the protocol. Never an
internal error, never a close the input caused by accident (1006, 1011),
and never an effect on another user. Property-based over the parser and
over whole sessions in memory."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netra.errors import NetraError
from netra.protocol import parse_client_message
from netra.testing import ConnectionEnded, config_for_tests, open_hub

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
fields = {
    "type": st.sampled_from(["auth", "user_message", "cancel", "ping", "nope", "", None, 3]),
    "text": json_values | st.text(max_size=50),
    "id": json_values,
    "thread_id": json_values,
    "run_id": json_values,
    "agent": json_values,
    "multitask": st.sampled_from(["reject", "enqueue", "interrupt", "x", None, 1]),
    "token": json_values,
}
messages = st.fixed_dictionaries({}, optional=fields).map(json.dumps)
frames = st.one_of(messages, st.text(max_size=200), st.binary(max_size=50), json_values.map(json.dumps))


@SETTINGS
@given(frames)
def test_the_parser_gives_a_message_or_a_netra_error(frame):
    try:
        message = parse_client_message(frame, max_bytes=2000, max_text_chars=100)
    except NetraError as exc:
        assert exc.code in ("bad_request", "unknown_type", "too_large")
    else:
        assert message.type in ("auth", "user_message", "cancel", "ping")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_json_numbers_are_malformed(literal):
    with pytest.raises(NetraError) as refused:
        parse_client_message('{"type": "ping", "id": "x", "n": %s}' % literal)
    assert refused.value.code == "bad_request"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(frames, min_size=1, max_size=15))
def test_any_frames_in_a_session_get_documented_answers_only(caplog, batch):
    caplog.set_level(logging.WARNING)
    caplog.clear()

    async def session() -> None:
        config = config_for_tests(max_bad_frames=10, rate_per_s=1000, rate_burst=1000)
        async with open_hub(config) as server:
            async with server.connect(user_id="fuzz") as fuzz, server.connect(user_id="bystander") as other:
                for frame in batch:
                    try:
                        await fuzz.client.send(frame)
                    except trio.ClosedResourceError:
                        break
                await fuzz.send({"type": "ping", "id": "last"})
                with trio.fail_after(30):
                    try:
                        while (await fuzz.receive()).get("id") != "last":
                            pass
                    except ConnectionEnded as ended:
                        assert ended.closed.code in (4400, 4401, 4429, 1009, 1007)
                for event in fuzz.received:
                    assert not (event["type"] == "error" and event["code"] == "internal"), event
                    assert event.get("code") != "internal", event
                    if event["type"] != "connected":
                        assert "user_id" not in event or event["user_id"] == "fuzz"
                # the other user saw nothing of it and is still served
                events = await other.run("hello")
                assert events[-1]["type"] == "agent_completed"
                assert [e["type"] for e in other.received].count("connected") == 1

    trio.run(session, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
