"""Triage: which agent handles a message.

A message that names an agent gets that agent. Otherwise the supervisor
scores each agent's keywords against the text and picks the best, falling
back to the set's default; deterministic, so the scripted model and tests see
the same routing every time.
"""

from __future__ import annotations

import re

from ..errors import NotFound
from .definition import Agent, AgentSet

_MARKERS = re.compile(r"\[\[.*?\]\]", re.DOTALL)


def route(agents: AgentSet, text: str, requested: str | None = None) -> Agent:
    if requested is not None:
        if requested not in agents:
            raise NotFound(f"no agent named {requested!r}; known: {', '.join(a.name for a in agents)}")
        return agents[requested]
    words = _MARKERS.sub(" ", text).lower()
    best, best_score = agents[agents.default], 0
    for agent in agents:
        score = sum(words.count(k) for k in agent.keywords)
        if score > best_score:
            best, best_score = agent, score
    return best
