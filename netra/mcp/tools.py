"""MCP tools as netra tools: their names, their argument checks, their calls.

Names. An MCP tool is shown to users as ``server.tool`` (events, stored tool
calls, metrics) but providers accept only ``^[A-Za-z0-9_-]{1,64}$`` as a
function name, so the model knows it as ``server__tool``. A character
providers refuse (MCP allows ``.`` and others) becomes ``_``; a name that
would then be longer than 64 characters, or the same as another tool's, is
cut to 55 characters and ends in ``_`` and 8 hex digits of the SHA-256 of
``server.tool``. The mapping depends only on the names involved, so a tool
keeps its model name across reconnects.

Arguments. An MCP tool's input schema is whatever JSON Schema its server
wrote, beyond what netra's own validator (made for the schemas netra
derives) knows, so it is checked with ``jsonschema`` (which the MCP SDK
depends on) before the call, and every problem is put in words a model can
act on. A schema ``jsonschema`` finds invalid keeps its tool from being
offered at all: providers refuse a request whose tool schema is broken, and
that would fail every turn of every agent given the tool.

Approval. Whether a tool's calls wait for the user is fixed when its server
lists it, from the server's ``needs_approval`` setting and, for the
annotation modes, what the listing says of the tool (:class:`ToolHints`); a
new listing builds new tools, so changed annotations take effect with it.
An agent may still say otherwise for itself (``Agent.approvals``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ..tools.base import Tool, ToolArgumentsError
from .config import ApprovalPolicy

log = logging.getLogger("netra.mcp")

_REFUSED = re.compile(r"[^A-Za-z0-9_-]")
_MAX_PROBLEMS = 10
_JSON_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "an object", "null": "null"}  # fmt: skip


@attrs.frozen
class ToolHints:
    """What a server's MCP annotations say a tool does (None: nothing; the
    spec's defaults are then not read-only and destructive). The spec's
    other hints do not bear on approval and are not kept: ``idempotentHint``
    is about calling again, not about the first call, and ``openWorldHint``
    about the tool's reach (a web search is open-world and harmless)."""

    read_only: bool | None = None
    destructive: bool | None = None


@attrs.frozen
class ToolInfo:
    """What an MCP server says about one of its tools (SDK types stay at the edge)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    hints: ToolHints = ToolHints()


@attrs.frozen(kw_only=True, eq=False)
class McpTool(Tool):
    """A tool of an MCP server. ``fn`` is the connection's call, given the
    tool's own name and the checked arguments."""

    server: str
    #: The tool's name on its server.
    remote_name: str
    #: Checks arguments against the tool's input schema (a jsonschema validator).
    validator: Any = attrs.field(repr=False)

    def parse_arguments(self, raw: str) -> dict[str, Any]:
        """Parse the model's argument text and check it against the input
        schema; raises :class:`ToolArgumentsError` listing what is wrong."""
        text = (raw or "").strip()
        try:
            value = json.loads(text, parse_constant=_refuse_constant) if text else {}
        except (ValueError, RecursionError) as exc:
            raise ToolArgumentsError([f"arguments are not valid JSON: {exc}"]) from None
        if not isinstance(value, dict):
            raise ToolArgumentsError([f"arguments must be a JSON object, got {_json_type(value)}"])
        problems = schema_problems(self.validator, value)
        if problems:
            raise ToolArgumentsError(problems)
        return value

    async def invoke(self, args: dict[str, Any], *, limiter: Any = None) -> Any:
        return await self.fn(self.remote_name, args)


def make_tools(
    server: str,
    listing: Iterable[ToolInfo],
    call: Callable[[str, dict[str, Any]], Any],
    *,
    taken: Callable[[str], bool],
    timeout_s: float | None,
    approval: ApprovalPolicy = ApprovalPolicy(),
) -> list[McpTool]:
    """The netra tools for one server's listing. ``taken`` says whether a
    model name is already another tool's (a built-in's, another server's);
    ``approval`` is the server's ``needs_approval``."""
    infos = list(listing)
    names = model_names(server, [i.name for i in infos], taken=taken)
    tools = []
    for info in infos:
        validator = _validator(server, info)
        if validator is None:
            continue
        description = info.description.strip() or f"The {info.name} tool of the {server} MCP server."
        tools.append(McpTool(
            name=names[info.name], label=f"{server}.{info.name}", description=description,
            parameters=copy.deepcopy(info.input_schema), fn=call, is_async=True, timeout_s=timeout_s,
            server=server, remote_name=info.name, validator=validator,
            needs_approval=approval.asks(info.name, read_only=info.hints.read_only,
                                         destructive=info.hints.destructive),
        ))  # fmt: skip
    return tools


def model_names(
    server: str, tools: Iterable[str], *, taken: Callable[[str], bool] = lambda name: False
) -> dict[str, str]:
    """Each tool's name for the model (see the module docstring)."""
    tools = list(dict.fromkeys(tools))
    plain = {t: _REFUSED.sub("_", f"{server}__{t}") for t in tools}
    counts: dict[str, int] = {}
    for name in plain.values():
        counts[name] = counts.get(name, 0) + 1
    names = {}
    for t, name in plain.items():
        if len(name) > 64 or counts[name] > 1 or taken(name):
            digest = hashlib.sha256(f"{server}.{t}".encode()).hexdigest()[:8]
            name = f"{name[:55]}_{digest}"
        names[t] = name
    return names


def _validator(server: str, info: ToolInfo) -> Any:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft202012Validator, validator_for

    schema = info.input_schema
    try:
        if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
            raise SchemaError("the input schema must describe an object")
        cls = validator_for(schema, default=Draft202012Validator)
        cls.check_schema(schema)
        return cls(schema)
    except Exception as exc:  # SchemaError, or a $schema or $ref jsonschema cannot resolve
        log.warning("MCP tool %s.%s left out: its input schema is invalid (%s)", server, info.name,
                    getattr(exc, "message", exc), extra={"mcp_server": server})  # fmt: skip
        return None


def schema_problems(validator: Any, value: dict[str, Any]) -> list[str]:
    """What is wrong with ``value``, one sentence per problem, in path order."""
    problems: list[str] = []
    for error in sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path]):
        for problem in _describe(error):
            if problem not in problems:
                problems.append(problem)
    return problems[:_MAX_PROBLEMS]


def _describe(error: Any) -> list[str]:
    path = list(error.absolute_path)
    label = f"argument '{_path(path)}'" if path else "the arguments"
    instance, schema = error.instance, error.schema if isinstance(error.schema, Mapping) else {}
    match error.validator:
        case "required" if isinstance(instance, dict):
            missing = [k for k in error.validator_value if k not in instance]
            return [f"missing required argument '{_path([*path, k])}'" for k in missing]
        case "additionalProperties" if isinstance(instance, dict) and error.validator_value is False:
            known = list(schema.get("properties", {}))
            patterns = list(schema.get("patternProperties", {}))
            extra = [k for k in instance if k not in known and not any(re.search(p, k) for p in patterns)]
            listed = ", ".join(known) or "none: this takes no arguments"
            return [f"unknown argument '{_path([*path, k])}' (known: {listed})" for k in extra]
        case "type":
            wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            expected = " or ".join(_JSON_NAMES.get(t, str(t)) for t in wanted)
            return [f"{label} must be {expected}, got {_json_type(instance)}"]
        case "enum":
            options = ", ".join(json.dumps(v) for v in error.validator_value)
            return [f"{label} must be one of {options}, got {_json_dump(instance)}"]
        case _:
            return [f"{label}: {error.message}"]


def _path(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f"[{json.dumps(part)}]" if text else str(part)
    return text


def _json_type(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"),
                       (str, "string"), (list, "list"), (dict, "object")):  # fmt: skip
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _json_dump(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")

