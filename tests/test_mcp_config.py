"""The mcp_servers setting: TOML tables, the JSON of NETRA_MCP_SERVERS, the
short forms, and a clear ValueError for anything else (never another
exception, whatever the text)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netra.config import Config, unknown_variables
from netra.mcp.config import McpServerConfig, parse_mcp_servers


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


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


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


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_names, _command_entry | _url_entry, max_size=4))
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
    assert parse_mcp_servers(servers) == servers
