"""Agents: frozen definitions, the built-in set, triage and the run loop."""

from .builtin import builtin_agents as builtin_agents
from .definition import Agent as Agent, AgentSet as AgentSet
from .supervisor import route as route
