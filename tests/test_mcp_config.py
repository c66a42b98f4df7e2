"""The mcp_servers setting: TOML tables, the JSON of NETRA_MCP_SERVERS, the
short forms, needs_approval in its forms, and a clear ValueError for
anything else (never another exception, whatever the text)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netra import cli
from netra.config import Config, unknown_variables
from netra.mcp.config import APPROVAL_MODES, ApprovalPolicy, McpServerConfig, parse_mcp_servers


def test_toml_tables_at_top_level_or_under_netra(tmp_path):
    for prefix in ("", "netra."):
        path = tmp_path / f"netra{len(prefix)}.toml"
        path.write_text(f"""
[{prefix}mcp_servers.files]
command = ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"]
env = {{ LOG_LEVEL = "warn" }}
cwd = "/srv"
agents = ["assistant"]

[{prefix}mcp_servers.search]
url = "https://search.example/mcp"
headers = {{ Authorization = "Bearer s3cret" }}
timeout_s = 10
concurrency = 4
connect_timeout_s = 5
""")
        files, search = Config.load(environ={}, file=path).mcp_servers
        assert files == McpServerConfig(
            name="files", command=("npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"),
            env=(("LOG_LEVEL", "warn"),), cwd="/srv", agents=("assistant",),
        )  # fmt: skip
        assert search == McpServerConfig(
            name="search", url="https://search.example/mcp", headers=(("Authorization", "Bearer s3cret"),),
            timeout_s=10.0, concurrency=4, connect_timeout_s=5.0,
        )  # fmt: skip
        assert files.gives_all_tools_to("assistant") and not files.gives_all_tools_to("data_analyst")
        assert search.gives_all_tools_to("anyone")


def test_the_environment_variable_is_the_same_table_in_json_and_wins_over_the_file(tmp_path):
    path = tmp_path / "netra.toml"
    path.write_text('[mcp_servers]\nold = "https://old.example/mcp"\n')
    value = json.dumps({"files": "npx -y server '/srv/my docs'", "tools": ["python", "-m", "tools"],
                        "search": "https://search.example/mcp"})  # fmt: skip
    config = Config.load(environ={"NETRA_MCP_SERVERS": value}, file=path)
    assert [s.name for s in config.mcp_servers] == ["files", "tools", "search"]
    assert config.mcp_servers[0].command == ("npx", "-y", "server", "/srv/my docs")
    assert config.mcp_servers[1].command == ("python", "-m", "tools")
    assert config.mcp_servers[2].url == "https://search.example/mcp"
    assert Config.load(environ={"NETRA_MCP_SERVERS": ""}).mcp_servers == ()
    assert Config.load(environ={}).mcp_servers == ()
    assert unknown_variables({"NETRA_MCP_SERVERS": "{}"}) == []


def test_config_built_in_code_takes_the_same_forms():
    config = Config(mcp_servers={"files": "npx server"})
    assert config.mcp_servers[0].command == ("npx", "server")
    assert Config(mcp_servers=config.mcp_servers) == config


def test_headers_and_env_stay_out_of_repr():
    config = Config(mcp_servers={
        "search": {"url": "https://s.example/mcp", "headers": {"Authorization": "Bearer tok-123"}},
        "files": {"command": "server", "env": {"API_KEY": "key-456"}},
    })  # fmt: skip
    assert "tok-123" not in repr(config) and "key-456" not in repr(config)
    assert config.mcp_servers[0].target == "https://s.example/mcp"
    assert config.mcp_servers[1].target == "server"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("not json", "invalid JSON"),
        ("[1, 2]", "expected a table"),
        ({"files": {}}, "either command"),
        ({"files": {"command": "x", "url": "https://x.example"}}, "either command"),
        ({"files": {"command": "x", "timeout": 3}}, "unknown keys timeout"),
        ({"files": {"command": []}}, "command is empty"),
        ({"files": {"command": "x 'unclosed"}}, "cannot split"),
        ({"files": {"command": ["x", 3]}}, "list of strings"),
        ({"files": {"url": "ftp://x.example"}}, "http:// or https://"),
        ({"files": {"url": "https://"}}, "http:// or https://"),
        ({"files": {"url": "http://x.example:99999/"}}, "not a URL"),
        ({"files": {"url": "https://x.example", "env": {"A": "b"}}}, "env is for a command"),
        ({"files": {"command": "x", "headers": {"A": "b"}}}, "headers are for a url"),
        ({"files": {"command": "x", "env": {"A": 1}}}, "must name a string"),
        ({"files": {"command": "x", "env": {"A=B": "c"}}}, "not a name"),
        ({"files": {"command": "x", "agents": "assistant"}}, "list of agent names"),
        ({"files": {"command": "x", "timeout_s": 0}}, "positive number of seconds"),
        ({"files": {"command": "x", "timeout_s": True}}, "positive number of seconds"),
        ({"files": {"command": "x", "concurrency": True}}, "whole number"),
        ({"files": {"command": "x", "concurrency": 0}}, "whole number"),
        ({"files": {"command": "x", "cwd": 3}}, "cwd"),
        ({"files": {"command": "x", "needs_approval": "yes"}}, 'needs_approval: expected true, false, "destructive"'),
        ({"files": {"command": "x", "needs_approval": "true"}}, "a list of tool names or a table"),
        ({"files": {"command": "x", "needs_approval": 1}}, "needs_approval: expected true, false"),
        ({"files": {"command": "x", "needs_approval": ["a", 2]}}, "needs_approval: expected a list of the server's"),
        ({"files": {"command": "x", "needs_approval": [""]}}, "needs_approval: expected a list of the server's"),
        ({"files": {"command": "x", "needs_approval": {"a": "no"}}}, 'needs_approval.a: expected true, false, "destructive" or "writes"'),
        ({"files": {"command": "x", "needs_approval": {"a b": None}}}, "needs_approval['a b']: expected"),
        ({"files": {"command": "x", "needs_approval": {"*": ["a"]}}}, "needs_approval['*']: expected"),
        ({"files": {"command": "x", "needs_approval": {"": True}}}, "needs_approval: '' is not a tool name"),
        ({"files": 3}, "expected a table, a URL or a command"),
        ({"my.files": "x"}, "server name"),
        ({"": "x"}, "server name"),
        ({"9lives": "x"}, "server name"),
    ],
)
def test_mistakes_are_refused_naming_the_entry(value, words):
    with pytest.raises(ValueError, match="mcp_servers") as caught:
        parse_mcp_servers(value if isinstance(value, str) else json.dumps(value))
    assert words in str(caught.value)


def test_a_bad_value_fails_loading_like_any_other_setting():
    with pytest.raises(ValueError, match=r"mcp_servers\.files: give either command"):
        Config.load(environ={"NETRA_MCP_SERVERS": '{"files": {}}'})


def test_needs_approval_in_its_toml_forms(tmp_path):
    path = tmp_path / "netra.toml"
    path.write_text("""
[mcp_servers.plain]
command = "srv"

[mcp_servers.all]
command = "srv"
needs_approval = true

[mcp_servers.some]
command = "srv"
needs_approval = ["write_file", "move_file", "write_file"]

[mcp_servers.marked]
url = "https://marked.example/mcp"
needs_approval = "destructive"

[mcp_servers.mixed]
command = "srv"
[mcp_servers.mixed.needs_approval]
"*" = "writes"
append_note = false
"lookup.city" = true
""")
    policies = {s.name: s.needs_approval for s in Config.load(environ={}, file=path).mcp_servers}
    assert policies == {
        "plain": ApprovalPolicy(),
        "all": ApprovalPolicy(default=True),
        "some": ApprovalPolicy(tools=(("write_file", True), ("move_file", True))),
        "marked": ApprovalPolicy(default="destructive"),
        "mixed": ApprovalPolicy(default="writes", tools=(("append_note", False), ("lookup.city", True))),
    }
    mixed = policies["mixed"]
    assert (mixed.rule_for("append_note"), mixed.rule_for("lookup.city"), mixed.rule_for("other")) == (
        False, True, "writes"
    )


def test_a_bad_needs_approval_stops_netra_serve_with_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("NETRA_DATABASE_URL", "none")
    monkeypatch.setenv("NETRA_JWT_SECRET", "x" * 32)
    monkeypatch.setenv("NETRA_MCP_SERVERS", json.dumps({"files": {"command": "srv", "needs_approval": "always"}}))
    assert cli.main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith(
        'netra serve: mcp_servers.files.needs_approval: expected true, false, "destructive", "writes", '
    )


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json | st.sampled_from([*APPROVAL_MODES, "*"]) | st.lists(st.sampled_from(["*", "a", "destructive"])))
def test_any_needs_approval_is_parsed_or_refused_naming_the_server(value):
    entry = json.dumps({"files": {"command": "srv", "needs_approval": value}})
    try:
        (server,) = parse_mcp_servers(entry)
    except ValueError as exc:
        assert str(exc).startswith("mcp_servers.files.needs_approval")
    else:
        policy = server.needs_approval
        assert all(rule is True or rule is False or rule in APPROVAL_MODES for _, rule in policy.tools)
        assert policy.default is True or policy.default is False or policy.default in APPROVAL_MODES
        assert "*" not in dict(policy.tools)
        for name in ("a", "b", "*"):
            assert isinstance(policy.asks(name), bool) and isinstance(policy.asks(name, read_only=True), bool)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _json.map(json.dumps)))
def test_any_text_is_parsed_or_refused_with_a_value_error(text):
    try:
        servers = parse_mcp_servers(text)
    except ValueError as exc:
        assert str(exc).startswith("mcp_servers")
    else:
        assert all(isinstance(s, McpServerConfig) and (bool(s.command) != (s.url is not None)) for s in servers)


_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,31}\Z")
_words = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=20)
_pairs = st.dictionaries(st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z"), _words, max_size=3)
_command_entry = st.fixed_dictionaries(
    {"command": st.lists(_words.filter(str.strip), min_size=1, max_size=4)},
    optional={"env": _pairs, "cwd": _words, "timeout_s": st.floats(0.001, 1e6), "agents": st.lists(_names, max_size=3)},
)
_url_entry = st.fixed_dictionaries(
    {"url": st.builds("https://{}.example/{}".format, _names, st.from_regex(r"\A[a-z/]{0,10}\Z"))},
    optional={"headers": _pairs, "concurrency": st.integers(1, 1000), "connect_timeout_s": st.floats(0.001, 1e6)},
)
_rules = st.booleans() | st.sampled_from(APPROVAL_MODES)
_tool_names = st.text(min_size=1, max_size=20).filter(lambda n: n != "*")
_approval = st.one_of(
    _rules,
    st.lists(_tool_names, max_size=4),
    st.dictionaries(_tool_names | st.just("*"), _rules, max_size=4),
)


def _expected_rule(needs_approval, tool):
    """What the written needs_approval says of ``tool``, read the simple way."""
    if isinstance(needs_approval, list):
        return tool in needs_approval
    if isinstance(needs_approval, dict):
        return needs_approval.get(tool, needs_approval.get("*", False))
    return needs_approval


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_names, st.tuples(_command_entry | _url_entry, st.none() | _approval), max_size=4).map(
    lambda t: {n: e if a is None else {**e, "needs_approval": a} for n, (e, a) in t.items()}
))
def test_every_valid_table_reads_back_as_written(table):
    servers = parse_mcp_servers(json.dumps(table))
    assert [s.name for s in servers] == list(table)
    for server in servers:
        entry = table[server.name]
        assert server.command == tuple(entry.get("command", ()))
        assert server.url == entry.get("url")
        assert dict(server.env) == entry.get("env", {}) and dict(server.headers) == entry.get("headers", {})
        assert server.cwd == entry.get("cwd")
        assert server.agents == (tuple(entry["agents"]) if "agents" in entry else None)
        assert server.timeout_s == entry.get("timeout_s")
        assert server.concurrency == entry.get("concurrency")
        assert server.connect_timeout_s == entry.get("connect_timeout_s", 30.0)
        written = entry.get("needs_approval", False)
        named = written if isinstance(written, list) else list(written) if isinstance(written, dict) else []
        for tool in [*named, "some_other_tool"]:
            assert server.needs_approval.rule_for(tool) == _expected_rule(written, tool)
    assert parse_mcp_servers(servers) == servers
