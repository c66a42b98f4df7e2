"""Every configured MCP server: the connections, and the tools agents get.

:class:`McpServers` belongs to the hub. :meth:`McpServers.run` runs in the
hub's nursery (the server's services), one task per server, and returns
from ``start`` once every server has been tried, so the first runs see
every tool that could be listed; a server that was not reachable then joins
when it is, and each listing after a reconnect replaces that server's tools
(``on_change`` tells the hub to recompute its agents' tools).

Which agents get which tools: every agent gets all tools of a server unless
its ``agents`` setting names the agents that do; besides, an agent may name
``server.tool`` or ``server.*`` among its tools.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import trio

from .config import McpServerConfig
from .connection import McpConnection, Opener, Session
from .tools import McpTool, make_tools

log = logging.getLogger("netra.mcp")


def _sdk_opener(config: McpServerConfig) -> AbstractAsyncContextManager[Session]:
    # imported here, not at the top: the SDK takes over a second to import,
    # and only servers that configure MCP should pay for it
    from .client import open_session

    return open_session(config)


@attrs.define(eq=False)
class McpServers:
    configs: tuple[McpServerConfig, ...] = ()
    #: Names netra's own tools use (an MCP tool's model name avoids them).
    reserved: frozenset[str] = frozenset()
    opener: Opener = _sdk_opener
    connections: tuple[McpConnection, ...] = attrs.field(init=False)
    _tools: dict[str, tuple[McpTool, ...]] = attrs.field(factory=dict, init=False)
    _on_change: Callable[[], None] = attrs.field(default=lambda: None, init=False)

    def __attrs_post_init__(self) -> None:
        self.connections = tuple(McpConnection(c, self.opener, self._listed) for c in self.configs)

    def check_agents(self, agents: Iterable[str]) -> None:
        """Refuse a server whose ``agents`` names an agent that does not exist
        (a typo would quietly give its tools to no one)."""
        known = set(agents)
        for config in self.configs:
            unknown = [a for a in config.agents or () if a not in known]
            if unknown:
                raise ValueError(
                    f"mcp_servers.{config.name}.agents: no agent named {', '.join(unknown)} "
                    f"(the agents: {', '.join(sorted(known))})"
                )

    def claims(self, name: str) -> bool:
        """Whether ``name`` (in an agent's tools) means an MCP tool: ``server.tool`` or ``server.*``."""
        server, dot, tool = name.partition(".")
        return bool(dot and tool) and any(c.name == server for c in self.configs)

    def tools_for(self, agent: str, names: Iterable[str]) -> list[McpTool]:
        """The MCP tools agent ``agent`` may call, whose own tool list is ``names``."""
        named = set(names)
        chosen: list[McpTool] = []
        for connection in self.connections:
            config, tools = connection.config, self._tools.get(connection.name, ())
            everything = config.gives_all_tools_to(agent) or f"{config.name}.*" in named
            chosen.extend(t for t in tools if everything or t.label in named)
            if connection.listing is not None:
                listed = {t.label for t in tools}
                for name in sorted(named):
                    if name.startswith(f"{config.name}.") and name != f"{config.name}.*" and name not in listed:
                        log.warning("agent %s names %s, which its MCP server does not offer", agent, name,
                                    extra={"mcp_server": config.name})  # fmt: skip
        return chosen

    async def run(
        self, on_change: Callable[[], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep every server's connection until cancelled; started once each
        has been tried (within its ``connect_timeout_s``)."""
        self._on_change = on_change
        async with trio.open_nursery() as nursery:
            for connection in self.connections:
                nursery.start_soon(connection.run, name=f"netra.mcp:{connection.name}")
            for connection in self.connections:
                await connection.first_settled.wait()
            task_status.started()

    def _listed(self, connection: McpConnection) -> None:
        others = {t.name for name, tools in self._tools.items() if name != connection.name for t in tools}
        config, listing = connection.config, connection.listing or ()
        self._tools[connection.name] = tuple(make_tools(
            connection.name, listing, connection.call,
            taken=lambda name: name in self.reserved or name in others,
            timeout_s=config.timeout_s, approval=config.needs_approval,
        ))  # fmt: skip
        _warn_unlisted(config, {i.name for i in listing})
        self._on_change()

    async def problems(self, timeout_s: float = 2.0) -> list[str]:
        """One line per server that does not answer now (all asked at once)."""
        found: dict[str, str] = {}

        async def check(connection: McpConnection) -> None:
            problem = await connection.check(timeout_s)
            if problem is not None:
                found[connection.name] = problem

        async with trio.open_nursery() as nursery:
            for connection in self.connections:
                nursery.start_soon(check, connection)
        return [f"mcp server {c.name}: {found[c.name]}" for c in self.connections if c.name in found]

    def states(self) -> dict[str, Any]:
        """Each server's state and tool count, for /readyz."""
        return {c.name: {"state": c.state, "tools": len(self._tools.get(c.name, ()))} for c in self.connections}


def _warn_unlisted(config: McpServerConfig, listed: set[str]) -> None:
    """Warn of tools ``needs_approval`` names that the server does not list:
    a typo there would let a tool run unasked. Not refused at start-up, as
    the server may be down then, and its listing may change."""
    for name, _rule in config.needs_approval.tools:
        if name in listed:
            continue
        own = name.removeprefix(f"{config.name}.")
        hint = f" (name it as the server does: {own})" if own != name and own in listed else ""
        log.warning("mcp_servers.%s.needs_approval names %s, which the server does not offer%s",
                    config.name, name, hint, extra={"mcp_server": config.name})  # fmt: skip
