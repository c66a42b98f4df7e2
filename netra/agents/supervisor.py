"""Triage: which agent handles a message.

Two ways to decide, one answer shape:

- :func:`route` is the rules: a message that names an agent gets that agent;
  otherwise each agent's keywords are scored against the text and the best
  wins, falling back to the set's default. Deterministic and synchronous, so
  the scripted model and tests see the same routing every time, and the
  session can validate a requested agent before it accepts the message.
- :func:`choose_agent` asks a real model, once, to pick an agent through a
  single ``route_to_agent`` tool whose argument is an enum of the agent
  names. It is a best-effort improvement over the rules, never a new way to
  fail: a model error, a timeout, no tool call or a name not in the set all
  fall back to :func:`route`. It emits nothing on the wire (the run's
  ``agent_started`` names whichever agent was chosen), and it runs inside the
  run's own task so the run's cancel scope covers it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from typing import Any

import trio

from ..errors import NotFound
from ..models.base import ChatMessage, Model, ModelRequest, ToolCallRequest, ToolSpec
from .definition import Agent, AgentSet

log = logging.getLogger("netra.agents")

_MARKERS = re.compile(r"\[\[.*?\]\]", re.DOTALL)
#: The routing tool's name (what the model is asked to call).
ROUTE_TOOL = "route_to_agent"
#: Characters of the user's message shown to the router: enough to tell what
#: it is about, bounded so a long paste does not make routing cost as much as
#: answering.
_ROUTE_TEXT_CHARS = 4000


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


def routing_request(agents: AgentSet) -> tuple[str, ToolSpec]:
    """The router's system prompt and its one tool, built from the set.

    The descriptions go in both places: some OpenAI-compatible servers drop
    tool descriptions from the prompt they build, none drops the system
    message.
    """
    names = [a.name for a in agents]
    listing = "\n".join(f"- {a.name}: {a.description}" for a in agents)
    prompt = (
        "You route a user's message to the agent best suited to answer it. "
        f"The agents are:\n{listing}\n"
        f"Call {ROUTE_TOOL} exactly once with the name of one agent; do not answer "
        f"the message yourself. If no agent fits better, choose {agents.default}."
    )
    spec = ToolSpec(
        name=ROUTE_TOOL,
        description=f"Hand the user's message to one agent. Agents:\n{listing}",
        parameters={
            "type": "object",
            "properties": {"agent": {"type": "string", "enum": names, "description": "The agent's name."}},
            "required": ["agent"],
            "additionalProperties": False,
        },
    )
    return prompt, spec


def model_routes(model: Model, agents: AgentSet, requested: str | None) -> bool:
    """Whether asking the model can change what the rules chose."""
    return requested is None and getattr(model, "name", None) != "scripted" and len(agents.agents) >= 2


async def choose_agent(
    hub_model: Model,
    agents: AgentSet,
    text: str,
    requested: str | None = None,
    *,
    timeout_s: float,
    limiter: trio.CapacityLimiter | None = None,
) -> Agent:
    """The agent for a message: the requested one, the rules' choice, or the
    model's.

    The model is asked only when it can add something: it is not the scripted
    model (whose routing must stay deterministic), the message names no agent,
    and there is more than one agent to choose from. ``timeout_s`` bounds the
    whole attempt, including the wait for ``limiter`` (the hub's model-call
    limiter), because a run should not sit behind a busy model just to be
    routed: past it, the rules decide. Cancellation is never swallowed.
    """
    if not model_routes(hub_model, agents, requested):
        return route(agents, text, requested)
    reason = f"no choice within {timeout_s:g}s"
    with trio.move_on_after(timeout_s if math.isfinite(timeout_s) else math.inf):
        try:
            name = await _ask(hub_model, agents, text, limiter)
        except Exception as exc:  # any provider failure: the rules still have an answer
            reason = f"the model failed ({type(exc).__name__}: {getattr(exc, 'message', exc)})"
        else:
            if name is not None and name in agents:
                return agents[name]
            reason = f"no {ROUTE_TOOL} call" if name is None else f"invalid choice {name[:100]!r}"
    log.info("routing by rules: %s", reason)
    return route(agents, text, None)


async def _ask(model: Model, agents: AgentSet, text: str, limiter: trio.CapacityLimiter | None) -> str | None:
    """One routing turn; the first valid ``route_to_agent`` name, else None."""
    prompt, spec = routing_request(agents)
    request = ModelRequest(
        messages=(
            ChatMessage(role="system", content=prompt),
            ChatMessage(role="user", content=text[:_ROUTE_TEXT_CHARS]),
        ),
        tools=(spec,),
    )
    chosen: str | None = None
    async with limiter or contextlib.nullcontext(), model.stream(request) as events:
        async for event in events:
            if chosen is None and isinstance(event, ToolCallRequest):
                chosen = _chosen(event)
    return chosen


def _chosen(call: ToolCallRequest) -> str | None:
    if call.name != ROUTE_TOOL:
        return None
    try:
        args: Any = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError):
        return None
    agent = args.get("agent") if isinstance(args, dict) else None
    return agent if isinstance(agent, str) else None
