"""Shared fixtures: a real netra server on an ephemeral loopback port."""

from __future__ import annotations

import pytest
import trio

from netra.metrics import live_tasks
from netra.testing import open_server, config_for_tests


@pytest.fixture
async def server():
    async with open_server(config_for_tests()) as running:
        yield running


def netra_tasks() -> list[str]:
    """Names of live tasks that belong to a netra connection or run."""
    return [t.name for t in live_tasks() if t.name.startswith(("netra.session", "netra.runs"))]


def by_label(counter) -> dict[str, float]:
    """A one-label counter's values, e.g. {"llm_error": 1.0}."""
    return {
        next(iter(s.labels.values())): s.value
        for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")
    }


async def settle(hub, *, timeout: float = 5.0) -> None:
    """Wait until the hub holds nothing: no runs, no borrowed capacity, no
    connection tasks. Fails (TooSlowError) if that never happens."""
    with trio.move_on_after(timeout):
        while True:
            snap = hub.snapshot()
            if (
                snap["runs_borrowed"] == 0
                and snap["queued_runs"] == 0
                and snap["connections"] == 0
                and snap["tools_borrowed"] == 0
                and snap["model_borrowed"] == 0
                and not netra_tasks()
            ):
                return
            await trio.sleep(0.01)
    raise AssertionError(f"the server did not settle: {hub.snapshot()} tasks={netra_tasks()}")


from ._backends import backend as backend, pg_database as pg_database  # noqa: E402  (shared fixtures)
