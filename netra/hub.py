"""The Hub: everything one netra server owns, built once by the app factory.

Nothing in netra is module-level or global: configuration, keys, agents,
tools, models, the store, limiters, the table of users and connections and
the metrics all hang off the Hub, and each connection's own state hangs off
its :class:`netra.session.Session` (and that session's nursery).
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from . import __version__
from .agents import AgentSet, builtin_agents
from .agents.runner import RunLimits, agent_tools
from .approvals import ApprovalBoard
from .auth import TokenVerifier, is_loopback
from .cluster.node import ClusterNode, NodeCounts
from .config import Config
from .limits import UserState
from .flusher import Flusher
from .mcp.servers import McpServers
from .metrics import Metrics, count_tasks
from .models.base import Model
from .models.scripted import ScriptedModel
from .runs import Ids
from .store.base import Store
from .tools import ToolRegistry, builtin_tools, chaos_tools

log = logging.getLogger("netra")


@attrs.define(eq=False, kw_only=True)
class Hub:
    config: Config
    verifier: TokenVerifier
    agents: AgentSet
    tools: ToolRegistry
    model: Model
    store: Store
    metrics: Metrics = attrs.field(factory=Metrics)
    #: This process's membership of a cluster (NETRA_REDIS_URL), or None.
    cluster: ClusterNode | None = None
    ids: Ids = attrs.field(factory=Ids)

    run_limiter: trio.CapacityLimiter = attrs.field(init=False)
    model_limiter: trio.CapacityLimiter = attrs.field(init=False)
    tool_limiters: dict[str, trio.CapacityLimiter] = attrs.field(init=False)
    #: What runs acquire: the limiters above, each in front of the
    #: cluster's shared one of the same name in a cluster.
    model_gate: Any = attrs.field(init=False)
    tool_gates: dict[str, Any] = attrs.field(init=False)
    agent_tools: dict[str, ToolRegistry] = attrs.field(init=False)
    agent_specs: dict[str, tuple[Any, ...]] = attrs.field(init=False)
    users: dict[str, UserState] = attrs.field(factory=dict)
    sessions: set[Any] = attrs.field(factory=set)
    #: Sessions a dropped connection may resume, by session id.
    resumable: dict[str, Any] = attrs.field(factory=dict)
    queued_runs: int = 0
    #: Tools every agent may call besides its own (chaos tools, tools given to build()).
    shared_tools: tuple[str, ...] = ()
    draining: bool = False
    store_ready: bool = True
    #: Hands every session's pending events to its transport once per scheduler pass.
    flusher: Flusher = attrs.field(factory=Flusher)
    #: The MCP servers' connections and the tools they offer (see netra.mcp).
    mcp: McpServers = attrs.field(factory=McpServers)
    #: Tool calls waiting for their user's decision (see netra.approvals).
    approvals: ApprovalBoard = attrs.field(factory=ApprovalBoard)
    #: The runs started over AG-UI, which may outlive their request (see netra.agui).
    agui: Any = attrs.field(init=False)
    # labelled metric children, each looked up once (see count_run)
    _runs_finished: dict[tuple[str, str], Any] = attrs.field(factory=dict, init=False)
    _tool_calls: dict[tuple[str, str], Any] = attrs.field(factory=dict, init=False)
    _tool_duration: dict[str, Any] = attrs.field(factory=dict, init=False)
    _model_turn: dict[str, Any] = attrs.field(factory=dict, init=False)
    _model_tokens: dict[str, Any] = attrs.field(factory=dict, init=False)
    _run_limits: dict[str, RunLimits] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.run_limiter = trio.CapacityLimiter(c.max_runs)
        self.model_limiter = trio.CapacityLimiter(c.max_model_calls)
        self.tool_limiters = {
            t.name: trio.CapacityLimiter(t.concurrency) for t in self.tools.values() if t.concurrency
        }
        self.model_gate, self.tool_gates = self.model_limiter, dict(self.tool_limiters)
        if self.cluster is not None:
            self._join(self.cluster)
        self.install_tools()
        self._wire_gauges()
        from .agui._runs import AguiRuns  # (netra.agui needs the hub's module: imported once it is)

        self.agui = AguiRuns(self)

    def _join(self, cluster: ClusterNode) -> None:
        self.model_gate = cluster.layered(self.model_limiter, "model")
        self.tool_gates = {name: cluster.layered(lim, f"tool:{name}") for name, lim in self.tool_limiters.items()}
        cluster.on_control = self.apply_control
        cluster.counts = self.node_counts
        cluster.sweep = self.store.close_orphaned_runs
        cluster.on_resume = self.resume_over_link
        cluster.ids_prefix = self.ids.prefix

    def resume_over_link(self, request: dict[str, Any]) -> None:
        """A resume that arrived on another node, of a session of this one:
        the session goes on over a link to that node (see cluster/link.py)."""
        from .auth import Identity
        from .cluster.link import LinkTransport
        from .session import find_resumable

        user_id = str(request["user_id"])
        target = find_resumable(self, str(request["session_id"]), user_id, str(request["resume_token"]))
        assert self.cluster is not None
        transport = LinkTransport(self.cluster, str(request["link"]), write_timeout_s=self.config.write_timeout_s)
        identity = Identity(user_id=user_id, expires_at=float(request["expires_at"]))
        target.resume_here(transport, int(request["last_seq"]), trio.Event(), identity)

    def apply_control(self, message: dict[str, Any]) -> None:
        """A control message another node sent this one: a cancel of runs
        of one user (the user is checked: a run id alone never suffices)."""
        if message.get("op") == "decide":  # a decision on an approval (netra.approvals)
            return self.approvals.apply_control(message)
        if message.get("op") != "cancel":
            return
        user = self.users.get(str(message.get("user_id")))
        run_ids = message.get("run_ids")
        if user is None or not isinstance(run_ids, list):
            return
        reason = "interrupted" if message.get("reason") == "interrupted" else "client"
        for run in list(user.runs):
            if run.id in run_ids:
                run.cancel(reason, by=user.user_id)

    def node_counts(self) -> NodeCounts:
        return NodeCounts(
            nodes=1,
            connections=len(self.sessions),
            runs_active=self.run_limiter.borrowed_tokens,
            runs_queued=self.queued_runs,
        )

    def install_tools(self) -> None:
        """Compute each agent's tools: its own and the shared ones, then those
        of the MCP servers, which are known only once listed (at open, and
        again when a server comes back with a different list). Runs already
        going keep the tools they started with."""
        shared = self.shared_tools
        if self.config.chaos_tools:
            shared = (*shared, *(t.name for t in chaos_tools()))
        mcp = self.mcp
        self.agent_tools = {
            a.name: agent_tools(a, self.tools, shared, elsewhere=mcp.claims).merged(
                mcp.tools_for(a.name, a.tool_names())
            )
            for a in self.agents
        }
        self.agent_specs = {name: registry.specs() for name, registry in self.agent_tools.items()}

    def _wire_gauges(self) -> None:
        """Gauges read at scrape time from the live objects (nothing to keep in sync)."""
        m = self.metrics
        m.tasks.set_function(count_tasks)
        m.runs_queued.set_function(lambda: self.queued_runs)
        m.runs_active.set_function(lambda: self.run_limiter.borrowed_tokens)
        m.outbox_queued.set_function(lambda: sum(s.queued_events() for s in list(self.sessions)))
        m.limiter_borrowed.labels("global").set_function(lambda: self.run_limiter.borrowed_tokens)
        m.limiter_borrowed.labels("model").set_function(lambda: self.model_limiter.borrowed_tokens)
        for name, limiter in self.tool_limiters.items():
            m.limiter_borrowed.labels(f"tool:{name}").set_function(lambda lim=limiter: lim.borrowed_tokens)
        if self.cluster is not None:
            cluster = self.cluster
            for kind in ("nodes", "connections", "runs_active", "runs_queued"):
                m.cluster.labels(kind).set_function(lambda k=kind: getattr(cluster.cluster, k))
            m.cluster_leases_lost.set_function(lambda: cluster.keeper.leases_lost)
        for connection in self.mcp.connections:  # an MCP server's concurrency
            if connection.limiter is not None:
                m.limiter_borrowed.labels(f"mcp:{connection.name}").set_function(
                    lambda lim=connection.limiter: lim.borrowed_tokens
                )
        for kind in ("size", "in_use", "waiting", "waits_total"):
            m.store_pool.labels(kind).set_function(lambda k=kind: getattr(self.store.stats(), k))

    # labelled metrics on the hot path: each child is looked up once

    def count_run(self, outcome: str, reason: str) -> None:
        key = (outcome, reason)
        child = self._runs_finished.get(key)
        if child is None:
            child = self._runs_finished[key] = self.metrics.runs_finished.labels(outcome, reason)
        child.inc()

    def count_tool_call(self, tool: str, outcome: str, seconds: float) -> None:
        key = (tool, outcome)
        child = self._tool_calls.get(key)
        if child is None:
            child = self._tool_calls[key] = self.metrics.tool_calls.labels(tool, outcome)
        child.inc()
        duration = self._tool_duration.get(tool)
        if duration is None:
            duration = self._tool_duration[tool] = self.metrics.tool_duration.labels(tool)
        duration.observe(seconds)

    def count_tokens(self, usage: dict[str, int]) -> None:
        for kind, value in usage.items():
            if value:
                child = self._model_tokens.get(kind)
                if child is None:
                    child = self._model_tokens[kind] = self.metrics.model_tokens.labels(kind)
                child.inc(value)

    def model_turn(self, outcome: str) -> Any:
        child = self._model_turn.get(outcome)
        if child is None:
            child = self._model_turn[outcome] = self.metrics.model_turn.labels(outcome)
        return child

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        agents: AgentSet | None = None,
        model: Model | None = None,
        store: Store | str = "config",
        extra_tools: Any = (),
    ) -> Hub:
        """Build a hub from config; tests and embedders may pass their own parts."""
        if config.dev_mode and not is_loopback(config.host):
            raise ValueError(f"development mode listens only on loopback, not on {config.host!r}")
        if store == "config":
            from .store import open_store

            store = open_store(config)
        cluster = None
        if config.redis_url:
            check_cluster_store(config, store)
            cluster = ClusterNode.from_url(
                config.redis_url, node_id=store.node_id, ttl=config.cluster_lease_ttl_s,
                prefix=config.redis_prefix,
            )
        agents = agents or _load_agents(config)
        tools = [*builtin_tools(), *agents.inline_tools(), *extra_tools]
        if config.chaos_tools:
            tools.extend(chaos_tools())
        registry = ToolRegistry(_dedupe(tools))
        mcp = McpServers(config.mcp_servers, reserved=frozenset(registry))
        mcp.check_agents(a.name for a in agents)
        return cls(
            config=config,
            verifier=TokenVerifier.from_config(config),
            agents=agents,
            tools=registry,
            model=model or _model_from_config(config),
            store=store,
            cluster=cluster,
            shared_tools=tuple(t.name for t in extra_tools),
            mcp=mcp,
        )

    async def open(self, nursery: trio.Nursery | None = None) -> None:
        """Open what the hub holds that needs it: the store (connect, migrate),
        the AG-UI run table and the MCP servers' connections, which live in
        ``nursery`` (the server's services; the MCP connections have all
        been tried when this returns)."""
        await self.store.open()
        if nursery is not None:  # the AG-UI runs live there, beyond their requests
            await nursery.start(self.agui.run)
        if self.mcp.connections:
            if nursery is None:
                raise RuntimeError("MCP servers are configured: Hub.open needs the nursery their connections live in")
            await nursery.start(self.mcp.run, self.install_tools)

    async def aclose(self) -> None:
        await self.store.aclose()
        aclose = getattr(self.model, "aclose", None)  # a provider's HTTP client
        if aclose is not None:
            await aclose()

    def run_limits(self, agent: Any) -> RunLimits:
        """An agent's limits for one run (made once per agent: agents are frozen)."""
        limits = self._run_limits.get(agent.name)
        if limits is not None and self.agents.agents.get(agent.name) is agent:
            return limits
        c = self.config
        limits = RunLimits(
            max_steps=agent.max_steps or c.max_steps,
            max_tool_calls=agent.max_tool_calls or c.max_tool_calls,
            tool_timeout_s=c.tool_timeout_s,
            first_chunk_timeout_s=c.model_first_chunk_timeout_s,
            idle_timeout_s=c.model_idle_timeout_s,
            max_output_bytes=c.max_output_bytes,
            max_tool_result_bytes=c.max_tool_result_bytes,
            cancel_emit_timeout_s=c.close_timeout_s,
            model_options=_model_options(agent, c),
        )
        if self.agents.agents.get(agent.name) is agent:
            self._run_limits[agent.name] = limits
        return limits

    def user(self, user_id: str) -> UserState:
        state = self.users.get(user_id)
        if state is None:
            state = self.users[user_id] = UserState(
                user_id=user_id, max_runs=self.config.max_runs_per_user
            )
        return state

    def forget_user_if_idle(self, state: UserState) -> None:
        if state.idle and self.users.get(state.user_id) is state:
            del self.users[state.user_id]

    def limits_advertised(self) -> dict[str, Any]:
        c = self.config
        return {
            "max_message_bytes": c.max_message_bytes,
            "max_text_chars": c.max_text_chars,
            "rate_per_s": c.rate_per_s,
            "rate_burst": c.rate_burst,
            "max_connections_per_user": c.max_connections_per_user,
            "max_runs_per_user": c.max_runs_per_user,
            "max_runs_per_connection": c.max_runs_per_connection,
            "max_queued_runs_per_user": c.max_queued_runs_per_user,
            "run_timeout_s": c.run_timeout_s,
            "max_steps": c.max_steps,
            "max_tool_calls": c.max_tool_calls,
            "tool_timeout_s": c.tool_timeout_s,
            "max_output_bytes": c.max_output_bytes,
            "write_timeout_s": c.write_timeout_s,
            "slow_consumer_timeout_s": c.write_timeout_s,  # its earlier name, still read by clients
            "heartbeat_interval_s": c.heartbeat_interval_s,
            "auth_timeout_s": c.auth_timeout_s,
            "default_multitask": c.default_multitask,
            "resume_window_s": c.resume_window_s,
        }

    def snapshot(self) -> dict[str, Any]:
        """Live counts, for tests and /readyz: all zero when nothing runs."""
        return {
            "connections": len(self.sessions),
            "users": len(self.users),
            "runs_borrowed": self.run_limiter.borrowed_tokens,
            "model_borrowed": self.model_limiter.borrowed_tokens,
            "tools_borrowed": sum(lim.borrowed_tokens for lim in self.tool_limiters.values()),
            "queued_runs": self.queued_runs,
        }

    @property
    def version(self) -> str:
        return __version__


def check_cluster_store(config: Config, store: Store) -> None:
    """A cluster's nodes share one store, and only PostgreSQL is one that
    several machines can share (SQLite is one machine's file; the memory
    store, one process's)."""
    from .store.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        raise ValueError(
            "cluster mode (NETRA_REDIS_URL) needs PostgreSQL as the store, shared by every node: "
            "set NETRA_DATABASE_URL=postgresql://... (SQLite and `none` are one machine's, "
            "so threads, message ids and node_lost would not hold across the cluster)"
        )


def _model_options(agent: Any, c: Config) -> dict[str, Any]:
    options: dict[str, Any] = {"max_tokens": agent.max_tokens or c.model_max_tokens}
    temperature = agent.temperature if agent.temperature is not None else c.model_temperature
    if temperature is not None:
        options["temperature"] = temperature
    return options


def _dedupe(tools: list[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for t in tools:
        if t.name in seen and seen[t.name] is not t:
            raise ValueError(f"two different tools are named {t.name!r}")
        seen[t.name] = t
    return list(seen.values())


def _load_agents(config: Config) -> AgentSet:
    if not config.agents:
        return builtin_agents()
    from .loader import load_agents

    return load_agents(config.agents)


def _model_from_config(config: Config) -> Model:
    match config.model:
        case "scripted":
            return ScriptedModel(delay_ms=config.scripted_delay_ms)
        case "openai":
            from .models.openai import from_config

            return from_config(config)
        case other:
            raise ValueError(f"unknown model provider {other!r} (scripted or openai)")
