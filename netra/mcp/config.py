"""The ``mcp_servers`` setting: which MCP servers netra connects to.

One value, two spellings of the same table. In the TOML file::

    [mcp_servers.files]
    command = ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"]
    env = { LOG_LEVEL = "warn" }

    [mcp_servers.search]
    url = "https://search.example/mcp"
    headers = { Authorization = "Bearer ..." }
    timeout_s = 10
    needs_approval = "destructive"

and in ``NETRA_MCP_SERVERS`` the same table as a JSON object
(``{"files": {"command": [...]}, "search": {"url": "..."}}``). An entry may
also be just a string, a URL (``"https://..."``) or a command line split as a
shell would (``"npx -y @modelcontextprotocol/server-filesystem /srv/docs"``),
or a list of strings, the command.

``needs_approval`` says which of a server's tools wait for the user's
approval (netra.approvals): ``true`` or ``false`` for all of them, a list of
the tools that do (by the server's own names), a table of tool names to
``true`` or ``false`` (``"*"``: every tool it does not name), or a mode that
follows what the server says of each tool in its MCP annotations
(:data:`APPROVAL_MODES`). The default is ``false``: a server's tools ran
without asking before the setting existed, and must not start waiting for
a decision nobody expects because netra was upgraded.

Parsing is strict: an unknown key, a wrong type or a server named both by
``command`` and ``url`` is a :class:`ValueError` naming the entry, so a typo
fails at start-up instead of quietly leaving a server out. This module does
not import the MCP SDK (the setting is parsed by every ``netra`` command).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

#: A server's name: the prefix of its tools' names (``files.read_file``).
SERVER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
#: A table key that messages may show bare (``needs_approval.write_file``); others are quoted.
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEYS = (
    "command", "url", "env", "headers", "cwd", "agents", "timeout_s", "concurrency", "connect_timeout_s",
    "needs_approval",
)  # fmt: skip

#: The annotation modes of ``needs_approval``: which tools ask by what their
#: server says of them (MCP ``ToolAnnotations``; where it says nothing, the
#: spec's defaults: not read-only, destructive). ``destructive`` asks for every
#: tool except those marked ``readOnlyHint: true`` or ``destructiveHint:
#: false``; ``writes`` for every tool except those marked ``readOnlyHint:
#: true``. Annotations are the server's hints: trusted as far as the operator
#: trusts the server, and a tool that says nothing asks.
APPROVAL_MODES: Final = ("destructive", "writes")
#: In a ``needs_approval`` table: the rule for every tool the table does not
#: name (the characters the MCP spec allows in tool names leave ``*`` out,
#: and ``server.*`` means all of a server's tools in an agent's tools too).
EVERY_TOOL: Final = "*"

#: One tool's rule: asks, does not, or as its annotations say (one of APPROVAL_MODES).
ApprovalRule = bool | str


@attrs.frozen(kw_only=True)
class ApprovalPolicy:
    """Which of one server's tools wait for the user's approval: a rule per
    tool it names, and one for every other tool. A rule is fixed when the
    server lists its tools (the annotations are the listing's), so a call
    costs no more than a built-in tool's."""

    #: The rule for every tool ``tools`` does not name.
    default: ApprovalRule = False
    #: (the server's name of a tool, its rule), in the order written.
    tools: tuple[tuple[str, ApprovalRule], ...] = ()

    def rule_for(self, tool: str) -> ApprovalRule:
        return next((rule for name, rule in self.tools if name == tool), self.default)

    def asks(self, tool: str, *, read_only: bool | None = None, destructive: bool | None = None) -> bool:
        """Whether calls of ``tool`` need approval, given what its server's
        annotations say (None: nothing, so the MCP defaults: not read-only,
        destructive)."""
        rule = self.rule_for(tool)
        if isinstance(rule, bool):
            return rule
        if read_only is True:  # changes nothing (its destructiveHint then means nothing, says the spec)
            return False
        if rule == "writes":
            return True
        return destructive is not False  # "destructive": unless it says it only adds


@attrs.frozen(kw_only=True)
class McpServerConfig:
    """One MCP server: how to reach it and how its tools are called."""

    name: str
    #: The command that starts a server speaking MCP on stdin/stdout.
    command: tuple[str, ...] = ()
    #: Or the URL of a streamable-HTTP server.
    url: str | None = None
    #: Variables set for the command, besides the few it inherits (PATH, HOME, ...).
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    #: HTTP headers sent with every request to ``url`` (tokens: kept out of repr).
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    #: Working directory of the command.
    cwd: str | None = None
    #: Agents given every tool of this server; None: all of them.
    agents: tuple[str, ...] | None = None
    #: Time limit of one call; None: ``tool_timeout_s``.
    timeout_s: float | None = None
    #: Calls to this server at once, all runs together; None: no limit.
    concurrency: int | None = None
    #: Time to start or reach the server and list its tools.
    connect_timeout_s: float = 30.0
    #: Which of its tools wait for the user's approval (an agent may say otherwise).
    needs_approval: ApprovalPolicy = ApprovalPolicy()

    @property
    def target(self) -> str:
        """How the server is reached, for messages (never the headers or env)."""
        return self.url if self.url is not None else shlex.join(self.command)

    def gives_all_tools_to(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents


def parse_mcp_servers(value: Any) -> tuple[McpServerConfig, ...]:
    """The servers named by ``value``: a JSON text, a table as TOML gives it,
    or already-parsed servers. Raises ValueError with the entry at fault."""
    if isinstance(value, tuple) and all(isinstance(v, McpServerConfig) for v in value):
        _check_unique(value)
        return value
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(
                f"mcp_servers: expected a JSON object of servers by name, got invalid JSON ({exc})"
            ) from None
    if not isinstance(value, Mapping):
        raise ValueError(f"mcp_servers: expected a table of servers by name, got {_kind(value)}")
    return tuple(_server(name, entry) for name, entry in value.items())


def _check_unique(servers: tuple[McpServerConfig, ...]) -> None:
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        raise ValueError(f"mcp_servers: a server name is used twice: {names}")


def _server(name: Any, entry: Any) -> McpServerConfig:
    if not isinstance(name, str) or not SERVER_NAME_RE.match(name):
        raise ValueError(
            f"mcp_servers: server name {name!r} must be a letter then up to 31 letters, digits, '_' or '-'"
        )
    where = f"mcp_servers.{name}"
    if isinstance(entry, str):
        entry = {"url": entry} if entry.strip().lower().startswith(("http://", "https://")) else {"command": entry}
    elif isinstance(entry, list):
        entry = {"command": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a table, a URL or a command, got {_kind(entry)}")
    unknown = [k for k in entry if k not in _KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(map(str, unknown))} (known: {', '.join(_KEYS)})")
    command = _command(entry.get("command"), where)
    url = _url(entry.get("url"), where)
    if bool(command) == (url is not None):
        raise ValueError(f"{where}: give either command (a server on stdin/stdout) or url (streamable HTTP)")
    env = _strings(entry.get("env"), f"{where}.env")
    headers = _strings(entry.get("headers"), f"{where}.headers")
    if env and url is not None:
        raise ValueError(f"{where}: env is for a command; a server at a url gets headers")
    if headers and command:
        raise ValueError(f"{where}: headers are for a url; a command gets env")
    cwd = entry.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or url is not None):
        raise ValueError(f"{where}.cwd: expected the folder (a string) a command runs in")
    agents = entry.get("agents")
    if agents is not None:
        if not isinstance(agents, list | tuple) or not all(isinstance(a, str) for a in agents):
            raise ValueError(f"{where}.agents: expected a list of agent names, got {_kind(agents)}")
        agents = tuple(agents)
    return McpServerConfig(
        name=name, command=command, url=url, env=env, headers=headers, cwd=cwd, agents=agents,
        timeout_s=_seconds(entry.get("timeout_s"), f"{where}.timeout_s", optional=True),
        concurrency=_count(entry.get("concurrency"), f"{where}.concurrency"),
        connect_timeout_s=_seconds(entry.get("connect_timeout_s", 30.0), f"{where}.connect_timeout_s"),
        needs_approval=_approval(entry.get("needs_approval"), f"{where}.needs_approval"),
    )  # fmt: skip


def _approval(value: Any, where: str) -> ApprovalPolicy:
    """``true``/``false``, a mode, a list of tool names that ask, or a
    table of tool names (``"*"``: the others) to any of the first two."""
    if value is None:
        return ApprovalPolicy()
    if isinstance(value, list | tuple):
        if not all(isinstance(n, str) and n for n in value):
            raise ValueError(f"{where}: expected a list of the server's tool names, got {_kind(value)}")
        value = dict.fromkeys(value, True)
    if not isinstance(value, Mapping):
        return ApprovalPolicy(default=_rule(value, where, whole=True))
    rules = {}
    for name, rule in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: {name!r} is not a tool name")
        rules[name] = _rule(rule, f"{where}.{name}" if _PLAIN_KEY_RE.match(name) else f"{where}[{name!r}]")
    default = rules.pop(EVERY_TOOL, False)
    return ApprovalPolicy(default=default, tools=tuple(rules.items()))


def _rule(value: Any, where: str, *, whole: bool = False) -> ApprovalRule:
    if isinstance(value, bool) or (isinstance(value, str) and value in APPROVAL_MODES):
        return value
    modes = [f'"{m}"' for m in APPROVAL_MODES]
    forms = (
        f"true, false, {', '.join(modes)}, a list of tool names or a table of tool names to those" if whole
        else f"true, false, {', '.join(modes[:-1])} or {modes[-1]}"
    )  # fmt: skip
    raise ValueError(f"{where}: expected {forms}, got {_kind(value)}")


def _command(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"{where}.command: cannot split {value!r} as a shell would: {exc}") from None
    elif isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
        parts = list(value)
    else:
        raise ValueError(f"{where}.command: expected a list of strings or a command line, got {_kind(value)}")
    if not parts or not parts[0].strip():
        raise ValueError(f"{where}.command: the command is empty")
    if any("\0" in p for p in parts):
        raise ValueError(f"{where}.command: a NUL character cannot be passed to a process")
    return tuple(parts)


def _url(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}.url: expected a URL, got {_kind(value)}")
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"{where}.url: {value!r} is not a URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}.url: expected an http:// or https:// URL, got {value!r}")
    return value.strip()


def _strings(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a table of names to strings, got {_kind(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError(f"{where}: {k!r} must name a string value, got {_kind(v)}")
        if "\0" in k or "\0" in v or (where.endswith(".env") and "=" in k):
            raise ValueError(f"{where}: {k!r} is not a name this can pass on")
    return tuple((str(k), str(v)) for k, v in value.items())


def _seconds(value: Any, where: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a whole number of calls (1 or more), got {value!r}")
    return value


def _kind(value: Any) -> str:
    return json.dumps(value)[:60] if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
