"""A decision reaches its run wherever it runs in a cluster, by the path a
cancel takes: checked on the node that received it against the approval the
shared store holds, then sent to the run's node. Real Redis and PostgreSQL,
real time (skipped with the reason when either does not answer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from netra.client import DecisionRefused, connect
from netra.server import Server
from netra.testing import open_server, token_for

from ._backends import uid
from .conftest import settle
from .test_approvals import TOOLS, TRANSFER
from .test_cluster import cluster_config as cluster_config, events_until
from .test_redis_trio import prefix as prefix, redis_url as redis_url  # fixtures

TEST_TIMEOUT = 30.0


@asynccontextmanager
async def two_nodes(make) -> AsyncIterator[tuple[Server, Server]]:
    async with open_server(make(), extra_tools=TOOLS) as a, open_server(make(), extra_tools=TOOLS) as b:
        yield a, b


async def test_a_decision_on_one_node_reaches_the_run_on_another(cluster_config) -> None:
    user, stranger_id = uid("u"), uid("v")  # the PostgreSQL database is the session's: users of their own
    with trio.fail_after(TEST_TIMEOUT):
        async with two_nodes(cluster_config) as (a, b):
            async with (
                connect(a.ws_url, token_for(a, user)) as on_a,
                connect(b.ws_url, token_for(b, user)) as on_b,
                connect(b.ws_url, token_for(b, stranger_id)) as stranger,
            ):
                run = on_a.run(TRANSFER)
                asked = (await events_until(run, "approval_required"))[-1].raw
                run_id, call_id = asked["run_id"], asked["tool_call_id"]
                for conn, ids in ((stranger, (run_id, call_id)), (on_b, (run_id, "call_9")), (on_b, ("run_x", call_id))):
                    with pytest.raises(DecisionRefused) as refused:
                        await conn.decide(*ids, approve=True)
                    assert refused.value.code == "not_found"
                # checked on the node that received it: the error is that client's, the call still waits
                with pytest.raises(DecisionRefused) as bad:
                    await on_b.decide(run_id, call_id, approve=True, args={"amount": "x", "to": "cy"})
                assert bad.value.code == "bad_request" and "must be an integer" in bad.value.message
                assert len(a.hub.approvals) == 1
                await on_b.decide(run_id, call_id, approve=True, args={"amount": 2, "to": "cy"})
                rest = [e async for e in run]
                assert [e.raw.get("result") for e in rest if e.type == "tool_completed"] == [{"sent": 2, "to": "cy"}]
                assert rest[-1].type == "agent_completed"
                # a denial crosses the same way
                run = on_a.run(TRANSFER)
                asked = (await events_until(run, "approval_required"))[-1].raw
                await on_b.decide(asked["run_id"], asked["tool_call_id"], approve=False, reason="no")
                rest = [e async for e in run]
                assert [e.raw.get("error") for e in rest if e.type == "tool_completed"] == [
                    "the user declined this call: no"
                ]
        await settle(a.hub)


async def test_a_run_waiting_for_approval_holds_no_place_in_the_clusters_run_capacity(cluster_config) -> None:
    """max_runs 1 for the whole cluster: while ann's run waits on node a for
    her decision, bo's runs on node b go on; once approved, ann's run takes
    the place back and completes."""
    ann, bo = uid("ann"), uid("bo")
    with trio.fail_after(TEST_TIMEOUT):
        make = lambda: cluster_config(max_runs=1)  # noqa: E731
        async with two_nodes(make) as (a, b):
            async with connect(a.ws_url, token_for(a, ann)) as on_a, connect(b.ws_url, token_for(b, bo)) as on_b:
                run = on_a.run(TRANSFER)
                asked = (await events_until(run, "approval_required"))[-1].raw
                for _ in range(2):
                    events = await on_b.collect("hello")
                    assert [e.type for e in events][0] == "agent_started"  # not queued behind ann's wait
                    assert events[-1].type == "agent_completed"
                await on_a.decide(asked["run_id"], asked["tool_call_id"], approve=True)
                assert [e async for e in run][-1].type == "agent_completed"
