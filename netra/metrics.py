"""Prometheus metrics, on a registry owned by the app (never the global one,
so two servers in one process, as in tests, never share counters)."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _registry_field(factory):
    return attrs.field(init=False, default=attrs.Factory(factory, takes_self=True))


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))

    connections_open: Gauge = _registry_field(
        lambda s: Gauge("netra_connections_open", "Open WebSocket connections.", registry=s.registry)
    )
    connections_opened: Counter = _registry_field(
        lambda s: Counter("netra_connections_opened", "Accepted WebSocket connections.", registry=s.registry)
    )
    connections_closed: Counter = _registry_field(
        lambda s: Counter(
            "netra_connections_closed", "Closed connections by the close code netra sent, or client.", ["code"], registry=s.registry
        )
    )
    connections_refused: Counter = _registry_field(
        lambda s: Counter(
            "netra_connections_refused", "Upgrades refused before accept, by HTTP status.", ["status"],
            registry=s.registry,
        )
    )
    runs_active: Gauge = _registry_field(
        lambda s: Gauge("netra_runs_active", "Runs executing now.", registry=s.registry)
    )
    runs_queued: Gauge = _registry_field(
        lambda s: Gauge("netra_runs_queued", "Runs waiting for a thread or capacity.", registry=s.registry)
    )
    runs_finished: Counter = _registry_field(
        lambda s: Counter(
            "netra_runs_finished", "Finished runs by outcome and reason.", ["outcome", "reason"],
            registry=s.registry,
        )
    )
    run_duration: Histogram = _registry_field(
        lambda s: Histogram(
            "netra_run_duration_seconds", "Run duration from agent_started.", buckets=_LATENCY,
            registry=s.registry,
        )
    )
    time_to_first_event: Histogram = _registry_field(
        lambda s: Histogram(
            "netra_run_time_to_first_event_seconds", "Message received to first event of its run.",
            buckets=_LATENCY, registry=s.registry,
        )
    )
    tool_calls: Counter = _registry_field(
        lambda s: Counter(
            "netra_tool_calls", "Tool calls by tool and outcome.", ["tool", "outcome"], registry=s.registry
        )
    )
    approvals: Counter = _registry_field(
        lambda s: Counter(
            "netra_approvals", "Tool calls that asked the user, by how that ended: approved, edited, "
            "denied, timeout, cancelled.", ["outcome"], registry=s.registry,
        )
    )
    tool_duration: Histogram = _registry_field(
        lambda s: Histogram(
            "netra_tool_duration_seconds", "Tool call latency.", ["tool"], buckets=_LATENCY,
            registry=s.registry,
        )
    )
    model_turn: Histogram = _registry_field(
        lambda s: Histogram(
            "netra_model_turn_seconds",
            "One model turn, from the request (capacity granted) to the end of its stream, by outcome.",
            ["outcome"], buckets=_LATENCY, registry=s.registry,
        )
    )
    model_first_event: Histogram = _registry_field(
        lambda s: Histogram(
            "netra_model_first_event_seconds", "From a model request to its first streamed event.",
            buckets=_LATENCY, registry=s.registry,
        )
    )
    model_tokens: Counter = _registry_field(
        lambda s: Counter("netra_model_tokens", "Model tokens by kind.", ["kind"], registry=s.registry)
    )
    bad_frames: Counter = _registry_field(
        lambda s: Counter("netra_bad_frames", "Refused client frames by error code.", ["code"], registry=s.registry)
    )
    slow_consumer_closes: Counter = _registry_field(
        lambda s: Counter(
            "netra_slow_consumer_closes", "Connections closed 4430 for not reading.", registry=s.registry
        )
    )
    transport_aborts: Counter = _registry_field(
        lambda s: Counter(
            "netra_transport_aborts", "Sockets cut because a close could not be flushed in time.",
            registry=s.registry,
        )
    )
    outbox_full: Counter = _registry_field(
        lambda s: Counter(
            "netra_outbox_full", "Events that found their connection's queue full (a slow reader).",
            registry=s.registry,
        )
    )
    deltas_merged: Counter = _registry_field(
        lambda s: Counter(
            "netra_deltas_merged", "text_delta events merged into the previous one while a client was behind.",
            registry=s.registry,
        )
    )
    connections_dropped: Counter = _registry_field(
        lambda s: Counter(
            "netra_connections_dropped",
            "Connections closed before their request was routed, by reason "
            "(max_connections, handshake_timeout, head_too_large, resources).",
            ["reason"], registry=s.registry,
        )
    )
    http_write_aborts: Counter = _registry_field(
        lambda s: Counter(
            "netra_http_write_aborts", "HTTP connections cut because a response write passed write_timeout_s.",
            registry=s.registry,
        )
    )
    sessions_detached: Counter = _registry_field(
        lambda s: Counter(
            "netra_sessions_detached", "Sessions whose connection dropped and that waited for a resume.",
            registry=s.registry,
        )
    )
    sessions_resumed: Counter = _registry_field(
        lambda s: Counter(
            "netra_sessions_resumed", "Resumes, by outcome (resumed: events replayed; resync_required).",
            ["outcome"], registry=s.registry,
        )
    )
    open_sockets: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_open_sockets", "Client connections open now, WebSocket and HTTP, authenticated or not.",
            registry=s.registry,
        )
    )
    outbox_queued: Gauge = _registry_field(
        lambda s: Gauge("netra_outbox_queued", "Events queued for all connections now.", registry=s.registry)
    )
    limiter_borrowed: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_limiter_borrowed", "Tokens borrowed from shared limiters now.", ["limiter"], registry=s.registry
        )
    )
    store_pool: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_store_pool", "Store connections: size, in_use, waiting, waits_total.", ["kind"],
            registry=s.registry,
        )
    )
    loop_lag: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_event_loop_lag_seconds", "How late the event loop woke a sleeping task, last sample.",
            registry=s.registry,
        )
    )
    tasks: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_trio_tasks", "Live trio tasks in the server process, counted at scrape time.",
            registry=s.registry,
        )
    )
    isolation_violations: Counter = _registry_field(
        lambda s: Counter(
            "netra_isolation_violations",
            "Events dropped because the connection's user does not own their run (must stay 0).",
            registry=s.registry,
        )
    )
    runs_failed: Counter = _registry_field(
        lambda s: Counter(
            "netra_runs_failed",
            "Runs that did not complete because of their own user: their model, tools, limits or"
            " connection (by cause). Failure containment: compare with netra_runs_affected_total.",
            ["cause"], registry=s.registry,
        )
    )
    runs_affected: Counter = _registry_field(
        lambda s: Counter(
            "netra_runs_affected",
            "Runs stopped by something outside their own user and the operator: a cancel on behalf of"
            " another user, or a teardown nobody asked for (by cause; must stay 0).",
            ["cause"], registry=s.registry,
        )
    )
    limiter_waits: Counter = _registry_field(
        lambda s: Counter(
            "netra_limiter_waits", "Runs that waited for capacity, by limiter.", ["limiter"], registry=s.registry
        )
    )

    cluster: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_cluster", "The cluster's counts as of this node's last heartbeat, by kind: nodes, "
            "connections, runs_active, runs_queued (absent outside a cluster).",
            ["kind"], registry=s.registry,
        )
    )
    cluster_leases_lost: Gauge = _registry_field(
        lambda s: Gauge(
            "netra_cluster_leases_lost", "Leases this node lost while holding them (Redis unreachable for a TTL).",
            registry=s.registry,
        )
    )

    def render(self) -> bytes:
        """The exposition text; call it from inside the trio run (task count)."""
        return generate_latest(self.registry)


def live_tasks() -> Iterator[trio.lowlevel.Task]:
    """Every live task of the current trio run, the root first."""
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def count_tasks() -> float:
    """The ``netra_trio_tasks`` gauge (nan outside a trio run)."""
    try:
        return float(sum(1 for _ in live_tasks()))
    except RuntimeError:
        return float("nan")
