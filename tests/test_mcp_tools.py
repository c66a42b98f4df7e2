"""MCP tools as netra tools: the names the model sees, argument checks
against a server's JSON schema in words a model can act on, and whether a
tool's calls wait for approval (its server's needs_approval and the tool's
annotations)."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netra.mcp.config import ApprovalPolicy, parse_mcp_servers
from netra.mcp.tools import McpTool, ToolHints, ToolInfo, make_tools, model_names
from netra.tools.base import _NAME_RE, ToolArgumentsError

PICK = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "note": {"type": "string", "maxLength": 10},
        "points": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}},
    },
    "required": ["count", "colour"],
    "additionalProperties": False,
}


async def _call(name, arguments):
    return {"called": name, "with": arguments}


def _tool(schema=PICK, name="pick") -> McpTool:
    (tool,) = make_tools("srv", [ToolInfo(name, "Pick some.", schema)], _call, taken=lambda n: False, timeout_s=5.0)
    return tool


def test_names_for_the_model_and_for_users():
    names = model_names("files", ["read_file", "lookup.city", "x" * 80])
    assert names["read_file"] == "files__read_file"
    assert names["lookup.city"] == "files__lookup_city"
    long = names["x" * 80]
    assert len(long) == 64 and _NAME_RE.match(long) and long.startswith("files__xxx")
    tool = _tool(name="lookup.city")
    assert (tool.name, tool.label) == ("srv__lookup_city", "srv.lookup.city")
    assert (tool.remote_name, tool.server) == ("lookup.city", "srv")
    assert tool.spec().name == "srv__lookup_city" and tool.timeout_s == 5.0


def test_names_that_would_clash_get_a_hash_and_stay_stable():
    names = model_names("s", ["a.b", "a_b", "c"], taken=lambda n: n == "s__c")
    assert names["a.b"] != names["a_b"] and all(n.startswith("s__a_b_") for n in (names["a.b"], names["a_b"]))
    assert names["c"].startswith("s__c_") and names["c"] != "s__c"
    assert model_names("s", ["a.b", "a_b", "c"], taken=lambda n: n == "s__c") == names


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,31}\Z"),
    st.lists(st.text(min_size=1, max_size=128), max_size=8),
)
def test_every_model_name_is_one_a_provider_accepts_and_no_two_are_alike(server, tools):
    names = model_names(server, tools)
    assert all(_NAME_RE.match(n) for n in names.values())
    assert len(set(names.values())) == len(names) == len(set(tools))
    assert model_names(server, tools) == names


def test_arguments_that_match_pass_through_unchanged():
    tool = _tool()
    assert tool.parse_arguments('{"count": 2, "colour": "red"}') == {"count": 2, "colour": "red"}
    assert _tool({"type": "object", "properties": {}}).parse_arguments("") == {}


@pytest.mark.parametrize(
    ("raw", "problems"),
    [
        ('{"count": 9, "colour": "red"}', ["argument 'count': 9 is greater than the maximum of 5"]),
        ('{"count": "2", "colour": "red"}', ["argument 'count' must be an integer, got string"]),
        ('{"count": 2, "colour": "purple"}', ['argument \'colour\' must be one of "red", "green", "blue", got "purple"']),
        ('{"count": 2}', ["missing required argument 'colour'"]),
        ('{}', ["missing required argument 'count'", "missing required argument 'colour'"]),
        ('{"count": 2, "colour": "red", "size": 1}', ["unknown argument 'size' (known: count, colour, note, points)"]),
        ('{"count": 2, "colour": "red", "points": [{"x": "a"}]}', ["argument 'points[0][\"x\"]' must be a number, got string"]),
        ('{"count": 2, "colour": "red", "note": "far too long"}', ["argument 'note': 'far too long' is too long"]),
        ("[1]", ["arguments must be a JSON object, got list"]),
        ("{nope", None),
        ('{"count": NaN}', None),
    ],
)
def test_each_problem_is_named_for_the_model(raw, problems):
    with pytest.raises(ToolArgumentsError) as caught:
        _tool().parse_arguments(raw)
    if problems is None:
        assert caught.value.problems[0].startswith("arguments are not valid JSON")
    else:
        assert list(caught.value.problems) == problems


def test_a_tool_with_a_broken_schema_is_left_out_with_a_warning(caplog):
    listing = [
        ToolInfo("good", "fine", {"type": "object", "properties": {"a": {"type": "string"}}}),
        ToolInfo("bad_type", "broken", {"type": "object", "properties": {"a": {"type": "nonsense"}}}),
        ToolInfo("not_object", "broken", {"type": "string"}),
        ToolInfo("no_description", "", {"type": "object"}),
    ]
    with caplog.at_level(logging.WARNING, logger="netra.mcp"):
        tools = make_tools("srv", listing, _call, taken=lambda n: False, timeout_s=None)
    assert [t.label for t in tools] == ["srv.good", "srv.no_description"]
    assert tools[1].description == "The no_description tool of the srv MCP server."
    assert "srv.bad_type left out" in caplog.text and "srv.not_object left out" in caplog.text


async def test_invoking_calls_the_server_by_its_own_name():
    tool = _tool(name="lookup.city")
    args = {"count": 1, "colour": "red"}
    assert await tool.invoke(args) == {"called": "lookup.city", "with": args}
    # the schema the model is shown is the server's, copied
    spec = tool.spec()
    spec.parameters["properties"].clear()
    assert json.dumps(tool.parameters) == json.dumps(PICK)


_OBJECT = {"type": "object"}
#: Each tool says something else in its annotations.
HINTED = [
    ToolInfo("bare", "Says nothing.", _OBJECT),
    ToolInfo("reader", "Read-only.", _OBJECT, ToolHints(read_only=True)),
    ToolInfo("reader_who_destroys", "Read-only wins.", _OBJECT, ToolHints(read_only=True, destructive=True)),
    ToolInfo("adder", "Writes, only adding.", _OBJECT, ToolHints(read_only=False, destructive=False)),
    ToolInfo("shredder", "Destroys.", _OBJECT, ToolHints(read_only=False, destructive=True)),
    ToolInfo("unsure", "Not read-only, no more said.", _OBJECT, ToolHints(read_only=False)),
]


def _asking(needs_approval) -> list[str]:
    """The tools of HINTED whose calls need approval under this setting."""
    (config,) = parse_mcp_servers({"srv": {"command": "x", "needs_approval": needs_approval}})
    tools = make_tools("srv", HINTED, _call, taken=lambda n: False, timeout_s=None, approval=config.needs_approval)
    assert all(t.needs_approval in (True, False) for t in tools)
    return [t.remote_name for t in tools if t.needs_approval]


ALL = [i.name for i in HINTED]


@pytest.mark.parametrize(
    ("needs_approval", "asking"),
    [
        (None, []),
        (False, []),
        (True, ALL),
        (["shredder", "reader", "absent"], ["reader", "shredder"]),
        ([], []),
        ({"adder": True, "bare": False}, ["adder"]),
        ({"*": True, "reader": False}, [n for n in ALL if n != "reader"]),
        # the spec's defaults where a tool says nothing: not read-only, destructive
        ("destructive", ["bare", "shredder", "unsure"]),
        ("writes", ["bare", "adder", "shredder", "unsure"]),
        ({"*": "destructive", "adder": True, "shredder": False}, ["bare", "adder", "unsure"]),
        ({"reader": "writes", "adder": "destructive"}, []),
        ({"*": "writes", "bare": "destructive"}, ["bare", "adder", "shredder", "unsure"]),
    ],
)
def test_needs_approval_chooses_tools_by_name_and_by_annotations(needs_approval, asking):
    assert _asking(needs_approval) == asking


def test_a_tool_without_annotations_asks_in_either_annotation_mode():
    for mode in ("destructive", "writes"):
        assert ApprovalPolicy(default=mode).asks("anything")
        assert not ApprovalPolicy(default=mode).asks("anything", read_only=True)
    assert ApprovalPolicy(default="writes").asks("t", read_only=False, destructive=False)
    assert not ApprovalPolicy(default="destructive").asks("t", read_only=False, destructive=False)
