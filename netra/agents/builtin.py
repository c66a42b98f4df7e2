"""The built-in agent set: a general assistant and two domain specialists."""

from __future__ import annotations

from .definition import Agent, AgentSet


def builtin_agents() -> AgentSet:
    general = Agent(
        name="assistant",
        description="General assistant: answers questions, does arithmetic, converts units.",
        instructions=(
            "You are a helpful, concise assistant. Use the calculator for any arithmetic "
            "and unit_convert for conversions instead of computing in your head. "
            "If a tool fails, say so plainly and answer as well as you can."
        ),
        tools=("calculator", "unit_convert", "current_time"),
    )
    analyst = Agent(
        name="data_analyst",
        description="Data analysis: summary statistics, percentiles, correlation and trends.",
        instructions=(
            "You analyse numeric data. Use statistics for summaries and percentiles and "
            "correlation for relationships between two series; explain what the numbers "
            "mean in plain words and state the sample size."
        ),
        tools=("statistics", "correlation", "calculator"),
        keywords=(
            "data", "dataset", "statistics", "mean", "median", "average", "percentile",
            "p95", "p99", "stdev", "variance", "correlation", "trend", "analy",
        ),
    )
    optimizer = Agent(
        name="cost_optimizer",
        description="Cost and latency optimisation of AI workloads: token costs, throughput, capacity.",
        instructions=(
            "You help teams cut the cost and latency of AI workloads. Use llm_cost_estimate "
            "for token costs and throughput_plan for latency and capacity; compare options "
            "with numbers and recommend one."
        ),
        tools=("llm_cost_estimate", "throughput_plan", "calculator", "unit_convert"),
        keywords=(
            "cost", "price", "pricing", "budget", "spend", "cheaper", "token", "latency",
            "throughput", "gpu", "capacity", "optimi", "requests per", "tokens per",
        ),
    )
    return AgentSet.of([general, analyst, optimizer], default="assistant")
