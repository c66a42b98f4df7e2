"""Your own agents and tools: loading them (``netra serve --agents``), running
them through a real server, the README example end to end, and triage by a
real model with its fallback to the rules."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from netra import cli
from netra.agents import Agent, AgentSet, builtin_agents
from netra.agents.supervisor import ROUTE_TOOL, choose_agent
from netra.client import connect
from netra.errors import LLMError
from netra.hub import Hub
from netra.loader import load_agents
from netra.models.base import ModelRequest, TextChunk, ToolCallRequest, Usage
from netra.testing import config_for_tests, open_server, token_for
from netra.tools import tool

from .conftest import settle
from .test_golden_path import assert_run_shape

README = Path(__file__).resolve().parent.parent / "README.md"


@tool
def book_room(nights: int, guests: int = 1) -> dict:
    """Book a hotel room.

    Args:
        nights: How many nights.
        guests: How many people.
    """
    return {"booked": True, "nights": nights, "guests": guests}


def hotel_agents() -> AgentSet:
    concierge = Agent(
        name="concierge",
        description="Books hotel rooms.",
        instructions="Book rooms with book_room.",
        tools=(book_room,),
    )
    return AgentSet.of([concierge])


# -- a user tool through the real server ----------------------------------------


async def test_user_tool_with_bad_arguments_is_a_failed_call_not_a_failed_run():
    async with open_server(config_for_tests(), agents=hotel_agents()) as server:
        with trio.fail_after(10):
            async with connect(server.ws_url, token_for(server, "ada")) as conn:
                events = await conn.collect('book it [[tool:book_room {"bad": "args"}]]')
                assert_run_shape(events)
                assert events[0].raw["agent"] == "concierge"
                (done,) = [e for e in events if e.type == "tool_completed"]
                assert done.raw["tool"] == "book_room" and "result" not in done.raw
                assert "missing required argument 'nights'" in done.raw["error"]
                assert "unknown argument 'bad'" in done.raw["error"]
                assert "failed" in events[-1].raw["text"]  # the model saw the failure

                events = await conn.collect('again [[tool:book_room {"nights": "two"}]]')
                (done,) = [e for e in events if e.type == "tool_completed"]
                assert "argument 'nights' must be an integer, got string" in done.raw["error"]
                assert events[-1].type == "agent_completed"

                events = await conn.collect('[[tool:book_room {"nights": 2.0}]]')
                (done,) = [e for e in events if e.type == "tool_completed"]
                assert done.raw["result"] == {"booked": True, "nights": 2, "guests": 1}
        await settle(server.hub)


# -- load_agents ----------------------------------------------------------------


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """Write throwaway modules into a folder on sys.path; each gets a fresh
    name, and everything imported during the test is forgotten after it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)

    def write(source: str, name: str | None = None) -> str:
        name = name or f"netra_test_agents_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    yield write
    for name in set(sys.modules) - before:
        del sys.modules[name]


HEADER = """
from netra.agents import Agent, AgentSet, builtin_agents
from netra.tools import tool

one = Agent(name="one", description="The first.", instructions="Be first.", tools=("calculator",))
two = Agent(name="two", description="The second.", instructions="Be second.")
"""


def test_load_each_accepted_shape(modules):
    name = modules(HEADER + """
as_set = AgentSet.of([one, two], default="two")
as_list = [two, one]
as_tuple = (one,)

def make_set():
    return AgentSet.of([one, two])

def make_list(prefix="ignored"):
    return [two]

class holder:
    agents = [one, two]
""")
    module = importlib.import_module(name)
    assert load_agents(f"{name}:as_set") is module.as_set
    assert load_agents(f"{name}:as_set").default == "two"
    listed = load_agents(f"{name}:as_list")
    assert [a.name for a in listed] == ["two", "one"] and listed.default == "two"
    assert [a.name for a in load_agents(f"{name}:as_tuple")] == ["one"]
    assert load_agents(f"{name}:make_set").default == "one"
    assert [a.name for a in load_agents(f"{name}:make_list")] == ["two"]  # defaults are fine
    assert load_agents(f" {name}:holder.agents ").default == "one"


def test_inline_tools_are_registered_by_the_hub(modules):
    name = modules(HEADER + """
@tool(timeout_s=3, concurrency=2)
def stamp(text: str) -> str:
    \"\"\"Stamp a text.\"\"\"
    return f"[{text}]"

agents = [Agent(name="clerk", description="Stamps.", instructions="Stamp.", tools=(stamp, "calculator"))]
""")
    agents = load_agents(f"{name}:agents")
    hub = Hub.build(config_for_tests(), agents=agents)
    assert hub.tools["stamp"] is agents["clerk"].tools[0]
    assert list(hub.agent_tools["clerk"])[:2] == ["stamp", "calculator"]
    assert hub.tool_limiters["stamp"].total_tokens == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{mod}", "package.module:attribute"),
        ("{mod}:", "package.module:attribute"),
        (":agents", "package.module:attribute"),
        ("{mod}:one two", "package.module:attribute"),
        ("{mod}:nothing", "has no attribute 'nothing'"),
        ("{mod}:number", "expected an AgentSet, a list of Agent, or a zero-argument function returning one, got an int"),
        ("{mod}:one", "got an Agent; wrap it in a list"),
        ("{mod}:empty", "the list of agents is empty"),
        ("{mod}:mixed", "item 1 of the list is a str, not an Agent"),
        ("{mod}:twins", "two agents are named 'one'"),
        ("{mod}:needs_args", "needs_args must take no arguments"),
        ("{mod}:broken", "calling broken() failed: RuntimeError: no config"),
        ("{mod}:returns_dict", "got a dict"),
        ("{mod}:returns_factory", "got function make_set"),
        ("{mod}:plain_function_tool", "agent 'bad' lists function helper as a tool (decorate it with @tool)"),
        ("{mod}:tools_string", "tools must be a tuple of names, got the string 'calculator'"),
        ("{mod}:clashing_tools", "two different tools are named 'helper'"),
        ("{mod}:AgentSet", "AgentSet must take no arguments"),
    ],
)
def test_load_errors_are_value_errors_that_say_what_is_wrong(modules, spec, message):
    name = modules(HEADER + """
number = 3
empty = []
mixed = [one, "two"]
twins = [one, one]

def needs_args(x):
    return [one]

def broken():
    raise RuntimeError("no config")

def returns_dict():
    return {"one": one}

def make_set():
    return AgentSet.of([one])

def returns_factory():
    return make_set

def helper(x: int) -> int:
    \"\"\"Help.\"\"\"
    return x

plain_function_tool = [Agent(name="bad", description="d", instructions="i", tools=(helper,))]
tools_string = [Agent(name="s", description="d", instructions="i", tools="calculator")]
clashing_tools = [
    Agent(name="a", description="d", instructions="i", tools=(tool(helper),)),
    Agent(name="b", description="d", instructions="i", tools=(tool(helper),)),
]
""")
    spec = spec.format(mod=name)
    error = ImportError if "no attribute" in message else ValueError
    with pytest.raises(error) as caught:
        load_agents(spec)
    assert message in str(caught.value)
    if "package.module:attribute" not in message:  # says which spec, for NETRA_AGENTS set long ago
        assert str(caught.value).startswith(spec.strip() + ": ")


def test_import_errors_name_what_is_missing(modules):
    with pytest.raises(ImportError, match=r"no module named 'netra_no_such_module_x'"):
        load_agents("netra_no_such_module_x:agents")
    with pytest.raises(ImportError, match=r"no module named 'netra.no_such_submodule'"):
        load_agents("netra.no_such_submodule:agents")
    needs = modules("import netra_missing_dependency_y\nagents = []\n")
    with pytest.raises(ImportError, match=rf"{needs}:agents: importing '{needs}' failed: No module named 'netra_missing_dependency_y'"):
        load_agents(f"{needs}:agents")
    # a @tool the schema deriver refuses fails at import time: still a clean message
    bad_tool = modules("""
from netra.tools import tool

@tool
def tally(items: set[int]) -> int:
    \"\"\"Count.\"\"\"
    return len(items)
""")
    with pytest.raises(ImportError, match=r"TypeError: tool 'tally' parameter 'items': unsupported annotation"):
        load_agents(f"{bad_tool}:agents")


def test_modules_next_to_the_command_are_found(tmp_path, monkeypatch, modules):
    """``netra`` is a console script: unlike ``python -m``, it does not put the
    current directory on sys.path, so the loader looks there itself."""
    here = tmp_path / "project"
    here.mkdir()
    name = f"netra_cwd_agents_{uuid.uuid4().hex[:8]}"
    (here / f"{name}.py").write_text(HEADER + "agents = [two]\n")
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(here))])
    assert [a.name for a in load_agents(f"{name}:agents")] == ["two"]
    assert sys.path[0] == str(here)


def test_netra_serve_reports_a_bad_agents_spec_and_exits_2(modules, monkeypatch, capsys):
    monkeypatch.setenv("NETRA_DATABASE_URL", "none")
    monkeypatch.setenv("NETRA_JWT_SECRET", "x" * 32)
    name = modules(HEADER + "agents = 42\n")
    assert cli.main(["serve", "--port", "0", "--agents", f"{name}:agents"]) == 2
    assert capsys.readouterr().err == f"netra serve: {name}:agents: expected an AgentSet, a list of Agent, or a zero-argument function returning one, got an int\n"
    assert cli.main(["serve", "--port", "0", "--agents", "netra_nowhere_z:agents"]) == 2
    assert capsys.readouterr().err.startswith("netra serve: netra_nowhere_z:agents: no module named 'netra_nowhere_z'")


# -- the README example, end to end --------------------------------------------


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- example: custom agents -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md lost its '<!-- example: custom agents -->' python block"
    return found.group(1)


async def test_readme_example_runs_end_to_end(modules):
    name = modules(readme_example())
    agents = load_agents(f"{name}:agents")
    assert [a.name for a in agents] == ["assistant", "shipping"] and agents.default == "assistant"
    quote = agents["shipping"].tools[0]
    assert quote.parameters["properties"]["zone"] == {
        "type": "string", "enum": ["eu", "us", "asia"], "description": "Destination zone.",
    }
    async with open_server(config_for_tests(), agents=agents) as server:
        with trio.fail_after(10):
            async with connect(server.ws_url, token_for(server, "grace")) as conn:
                ask = 'How much to ship a 2 kg parcel to Lyon? [[tool:shipping_quote {"weight_kg": 2, "zone": "eu"}]]'
                events = await conn.collect(ask)
                assert_run_shape(events)
                assert events[0].raw["agent"] == "shipping"  # routed by its keywords
                (call,) = [e for e in events if e.type == "tool_executing"]
                assert call.raw["args"] == {"weight_kg": 2, "zone": "eu"}
                (done,) = [e for e in events if e.type == "tool_completed"]
                assert done.raw["result"] == {"price_eur": 13.0, "days": 2}
                assert "13.0" in events[-1].raw["text"]

                events = await conn.collect('ship [[tool:shipping_quote {"weight_kg": -1, "zone": "mars"}]]')
                (done,) = [e for e in events if e.type == "tool_completed"]
                assert "argument 'zone' must be one of \"eu\", \"us\", \"asia\"" in done.raw["error"]
                events = await conn.collect('ship [[tool:shipping_quote {"weight_kg": -1, "zone": "us"}]]')
                (done,) = [e for e in events if e.type == "tool_completed"]
                assert done.raw["error"] == "ValueError: weight_kg must be positive"
                assert events[-1].type == "agent_completed"

                events = await conn.collect("what is [[tool:calculator {\"expression\": \"2+2\"}]]")
                assert events[0].raw["agent"] == "assistant"
        await settle(server.hub)


# -- choose_agent: a real model picks, the rules catch every failure -----------------


@attrs.define(eq=False)
class FakeModel:
    """Answers every request with ``script`` (events, or an exception to raise,
    or "hang"), and keeps the requests."""

    script: list = attrs.field(factory=list)
    name: str = "fake"
    requests: list[ModelRequest] = attrs.field(factory=list)

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator]:
        self.requests.append(request)
        yield self._events()

    async def _events(self):
        for item in self.script:
            await trio.lowlevel.checkpoint()
            if item == "hang":
                await trio.sleep_forever()
            if isinstance(item, BaseException):
                raise item
            yield item


def pick(name: str, call_name: str = ROUTE_TOOL) -> list:
    return [ToolCallRequest(id="r1", name=call_name, arguments=f'{{"agent": "{name}"}}'), Usage(prompt_tokens=5)]


COSTLY = "what does it cost per token on a gpu?"  # the rules say cost_optimizer


async def test_the_model_picks_the_agent_with_one_route_tool():
    agents, model = builtin_agents(), FakeModel(pick("data_analyst"))
    limiter = trio.CapacityLimiter(1)
    with trio.fail_after(5):
        chosen = await choose_agent(model, agents, COSTLY, None, timeout_s=2, limiter=limiter)
    assert chosen is agents["data_analyst"]
    (request,) = model.requests
    (spec,) = request.tools
    assert spec.name == "route_to_agent"
    assert spec.parameters["properties"]["agent"]["enum"] == ["assistant", "data_analyst", "cost_optimizer"]
    assert spec.parameters["required"] == ["agent"]
    system, user = request.messages
    assert system.role == "system" and user.role == "user" and user.content == COSTLY
    for agent in agents:
        assert f"- {agent.name}: {agent.description}" in system.content
        assert agent.description in spec.description
    assert limiter.borrowed_tokens == 0


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(pick("nobody"), id="not-an-agent"),
        pytest.param(pick("data_analyst", call_name="calculator"), id="other-tool"),
        pytest.param([ToolCallRequest(id="r", name=ROUTE_TOOL, arguments='{"agent": 7}')], id="not-a-string"),
        pytest.param([ToolCallRequest(id="r", name=ROUTE_TOOL, arguments='{"agent": "da')], id="bad-json"),
        pytest.param([TextChunk("data_analyst")], id="text-only"),
        pytest.param([LLMError("openai: HTTP 500")], id="model-error"),
        pytest.param([TextChunk("hm"), ValueError("a buggy provider")], id="crash"),
        pytest.param(["hang"], id="timeout"),
    ],
)
async def test_any_failure_falls_back_to_the_rules(script):
    agents, model = builtin_agents(), FakeModel(script)
    with trio.fail_after(5):
        started = trio.current_time()
        chosen = await choose_agent(model, agents, COSTLY, None, timeout_s=0.3)
    assert chosen is agents["cost_optimizer"]
    assert len(model.requests) == 1
    assert trio.current_time() - started < 2


async def test_the_model_is_not_asked_when_it_cannot_help():
    agents = builtin_agents()
    asked = FakeModel(pick("data_analyst"))
    with trio.fail_after(5):
        assert await choose_agent(asked, agents, COSTLY, "assistant", timeout_s=1) is agents["assistant"]
        single = AgentSet.of([agents["assistant"]])
        assert await choose_agent(asked, single, COSTLY, None, timeout_s=1) is agents["assistant"]
        scripted = FakeModel(pick("data_analyst"), name="scripted")
        assert await choose_agent(scripted, agents, COSTLY, None, timeout_s=1) is agents["cost_optimizer"]
        with pytest.raises(Exception, match="no agent named 'nobody'"):
            await choose_agent(asked, agents, COSTLY, "nobody", timeout_s=1)
    assert asked.requests == [] and scripted.requests == []


async def test_cancelling_the_run_cancels_routing():
    """Routing runs in the run's task: a cancelled run must not be routed by
    the rules and carry on."""
    agents, model = builtin_agents(), FakeModel(["hang"])
    with trio.fail_after(5):
        with trio.move_on_after(0.1) as outer:
            await choose_agent(model, agents, COSTLY, None, timeout_s=30)
            pytest.fail("routing swallowed the cancellation")
    assert outer.cancelled_caught


def test_an_agent_says_which_of_its_tools_need_approval():
    """An agent's own word on a tool wins over the tool's; naming a tool it
    does not have is a configuration error, said at start-up."""
    from netra.agents import Agent, AgentSet
    from netra.agents.runner import agent_tools
    from netra.tools import ToolRegistry, builtin_tools, tool

    @tool(needs_approval=True)
    def wipe(path: str) -> str:
        """Delete a file."""
        return path

    registry = ToolRegistry([*builtin_tools(), wipe])
    careful = Agent(name="careful", description="d", instructions="i", tools=("calculator", wipe),
                    approvals={"calculator": True})
    trusting = Agent(name="trusting", description="d", instructions="i", tools=(wipe,), approvals={"wipe": False})
    assert careful.approval_rule(registry["calculator"]) is True
    assert careful.approval_rule(wipe) is True  # the tool's own
    assert trusting.approval_rule(wipe) is False
    assert hash(careful) == hash(Agent(name="careful", description="d", instructions="i",
                                       tools=("calculator", wipe), approvals={"calculator": True}))
    agent_tools(careful, registry)
    stray = Agent(name="stray", description="d", instructions="i", tools=("calculator",), approvals={"wipe": True})
    with pytest.raises(ValueError, match="approvals for tools it does not have: wipe"):
        agent_tools(stray, registry)
    assert AgentSet.of([careful, trusting]).default == "careful"
