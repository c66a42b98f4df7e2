"""Agent definitions: frozen values, never live objects.

An :class:`Agent` says what an agent is (instructions, tools, model, limits);
a run builds everything it needs from it and the tool registry, so no agent
instance is ever shared between runs or users.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

from ..tools import Tool
from ..tools.base import ApprovalRule


@attrs.frozen(kw_only=True)
class Agent:
    name: str
    description: str
    instructions: str
    #: Tools this agent may call: registered tool names or Tool values.
    tools: tuple[str | Tool, ...] = ()
    #: Model name for the provider (None: the provider's default).
    model: str | None = None
    #: Words that send a message to this agent when routing by rules.
    keywords: tuple[str, ...] = ()
    max_steps: int | None = None
    max_tool_calls: int | None = None
    timeout_s: float | None = None
    #: Most tokens of one model answer, and the sampling temperature (None:
    #: the server's model_max_tokens / model_temperature).
    max_tokens: int | None = None
    temperature: float | None = None
    #: Per tool name: whether this agent's calls of it wait for the user's
    #: approval (True, False, or a predicate on the checked arguments),
    #: instead of what the tool itself declares (``needs_approval``). The
    #: same tool may be harmless for one agent and need a yes for another.
    approvals: Mapping[str, ApprovalRule] = attrs.field(
        factory=dict, converter=lambda m: MappingProxyType(dict(m)), hash=False
    )

    def tool_names(self) -> tuple[str, ...]:
        return tuple(t if isinstance(t, str) else t.name for t in self.tools)

    def approval_rule(self, tool: Tool) -> ApprovalRule:
        """Whether this agent's calls of ``tool`` need approval: its own
        word for the tool (by the name it gives the tool: an MCP tool's
        ``server.tool``), else the tool's."""
        approvals = self.approvals
        if not approvals:
            return tool.needs_approval
        if tool.label is not None and tool.label in approvals:
            return approvals[tool.label]
        return approvals.get(tool.name, tool.needs_approval)


@attrs.frozen
class AgentSet:
    """The agents a server offers, by name, and the one used when routing finds no better."""

    agents: Mapping[str, Agent] = attrs.field(converter=lambda m: MappingProxyType(dict(m)))
    default: str

    @classmethod
    def of(cls, agents: Iterable[Agent], *, default: str | None = None) -> AgentSet:
        table: dict[str, Agent] = {}
        for agent in agents:
            if agent.name in table:
                raise ValueError(f"two agents are named {agent.name!r}")
            table[agent.name] = agent
        if not table:
            raise ValueError("an agent set needs at least one agent")
        chosen = default or next(iter(table))
        if chosen not in table:
            raise ValueError(f"default agent {chosen!r} is not in the set")
        return cls(table, chosen)

    def __getitem__(self, name: str) -> Agent:
        return self.agents[name]

    def __contains__(self, name: object) -> bool:
        return name in self.agents

    def __iter__(self):
        return iter(self.agents.values())

    def inline_tools(self) -> list[Tool]:
        """Tools given as values in agent definitions (registered at start-up)."""
        seen: dict[str, Tool] = {}
        for agent in self:
            for t in agent.tools:
                if isinstance(t, Tool):
                    if t.name in seen and seen[t.name] is not t:
                        raise ValueError(f"two different tools are named {t.name!r}")
                    seen[t.name] = t
        return list(seen.values())
