"""Tools: typed Python functions an agent's model may call.

A :class:`Tool` is built from an ordinary function by :func:`tool`, which
derives the JSON schema the model is shown from the function's annotations,
so the schema and the code cannot drift apart. The same schema is enforced on
the way back: the model's argument text is parsed and checked by
:meth:`Tool.parse_arguments` before the function runs, and every problem is
reported in words a model can act on, because the error goes back to the
model as a failed tool result and it gets to try again.

The validator is hand-written and supports exactly the schemas the deriver
produces (a few dozen lines instead of a jsonschema dependency whose error
messages are written for programmers, not for models).

Timeouts, error handling and per-tool concurrency are the runner's job; this
module only describes a tool and calls it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin, overload

import attrs
import trio

from netra.errors import ToolError
from netra.models.base import ToolSpec

#: What providers accept as a function name (OpenAI's rule, the strictest).
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SUPPORTED = (
    "str, int, float, bool, list[T], dict[str, T], Literal[...], T | None, "
    "Annotated[T, 'description']"
)
_JSON_NAMES = types.MappingProxyType(
    {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
     "array": "a list", "object": "an object", "null": "null"}
)  # fmt: skip
#: JSON names of Python values, in checking order (bool before int: True is an int).
_VALUE_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"),
                (str, "string"), (list, "list"), (dict, "object"))  # fmt: skip
_SCALARS = types.MappingProxyType({bool: "boolean", int: "integer", float: "number", str: "string"})
#: Stop listing problems after this many: the model only needs a start.
_MAX_PROBLEMS = 10


class ToolArgumentsError(ToolError):
    """The model's arguments for a tool are not valid JSON or do not match its
    schema. ``problems`` lists each problem; the message joins them."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def _name_ok(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _NAME_RE.match(value):
        raise ValueError(f"tool name {value!r} must match {_NAME_RE.pattern}")


def _positive_or_none(_: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    counted = attribute.name == "concurrency"  # a count of calls: a whole number
    whole = not counted or (isinstance(value, int) and not isinstance(value, bool))
    if value is not None and not (whole and value > 0):
        kind = "int" if counted else "number"
        raise ValueError(f"{attribute.name} must be a positive {kind} or None, got {value!r}")


#: Whether a call needs the user's approval: always, never, or as a predicate
#: on the call's checked arguments says.
ApprovalRule = bool | Callable[[dict[str, Any]], bool]


def _rule_ok(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not (isinstance(value, bool) or callable(value)):
        raise TypeError(f"{attribute.name} must be True, False or a predicate on the arguments, got {value!r}")


@attrs.frozen(kw_only=True, eq=False)
class Tool:
    """A callable the model may use. Compared by identity: two tools with the
    same name are different tools (the registry refuses to hold both)."""

    name: str = attrs.field(validator=_name_ok)
    description: str
    #: JSON schema of the arguments: an object with properties.
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    is_async: bool = attrs.field(
        default=attrs.Factory(lambda self: inspect.iscoroutinefunction(self.fn), takes_self=True)
    )
    #: Per-call time limit; None means the server's default (``tool_timeout_s``).
    timeout_s: float | None = attrs.field(default=None, validator=_positive_or_none)
    #: Most calls of this tool running at once, server-wide; None: unlimited.
    concurrency: int | None = attrs.field(default=None, validator=_positive_or_none)
    #: For a sync function: whether it may block (I/O, long CPU). A blocking one
    #: runs in a worker thread; a quick, bounded one (False) runs inline, saving
    #: the thread round trip. Ignored for async functions.
    blocking: bool = True
    #: What users are shown for this tool (events, stored calls, metrics) when
    #: it differs from the name the model uses (an MCP tool's ``server.tool``).
    label: str | None = None
    #: Whether a call waits for the user's approval before it runs (True, or
    #: a predicate on the checked arguments). An agent may say otherwise for
    #: itself (``Agent.approvals``).
    needs_approval: ApprovalRule = attrs.field(default=False, validator=_rule_ok)

    def spec(self) -> ToolSpec:
        """What the model is told. The schema is copied so that a provider
        adapter rewriting it (some do) cannot change this tool."""
        return ToolSpec(name=self.name, description=self.description, parameters=copy.deepcopy(self.parameters))

    def parse_arguments(self, raw: str) -> dict[str, Any]:
        """Parse the model's argument text and check it against the schema.

        Returns the arguments to call the function with: numbers where the
        schema asks for a float are floats, and an optional parameter without
        a Python default that the model left out is passed as None. Raises
        :class:`ToolArgumentsError`.
        """
        text = (raw or "").strip()
        if not text:
            value: Any = {}  # models often send nothing for a tool without parameters
        else:
            try:
                value = json.loads(text, parse_constant=_refuse_constant)
            except (ValueError, RecursionError) as exc:
                raise ToolArgumentsError([f"arguments are not valid JSON: {exc}"]) from None
        if not isinstance(value, dict):
            raise ToolArgumentsError([f"arguments must be a JSON object, got {_json_type(value)}"])
        return self.check_arguments(value)

    def check_arguments(self, value: dict[str, Any]) -> dict[str, Any]:
        """Check already-decoded arguments (a user's edit of a call, say)
        against the schema, exactly as :meth:`parse_arguments` checks the
        model's text. Raises :class:`ToolArgumentsError`."""
        problems: list[str] = []
        args = _check_object(self.parameters, value, "", problems)
        if problems:
            raise ToolArgumentsError(problems[:_MAX_PROBLEMS])
        for key, prop in self.parameters.get("properties", {}).items():
            if key not in args and "default" not in prop and _allows_null(prop):
                args[key] = None
        return args

    async def invoke(self, args: dict[str, Any], *, limiter: trio.CapacityLimiter | None = None) -> Any:
        """Call the function with already-parsed arguments.

        An async function is awaited in this task. A sync one runs in a worker
        thread (``limiter`` bounds those threads; None is trio's default) and
        is abandoned if this call is cancelled: the run moves on at once while
        the thread finishes in the background, since a thread cannot be
        interrupted. Exceptions propagate; the runner turns them into failed
        tool results and applies the timeout.
        """
        if self.is_async:
            return await self.fn(**args)
        if not self.blocking:
            await trio.lowlevel.checkpoint_if_cancelled()
            return self.fn(**args)
        return await trio.to_thread.run_sync(
            functools.partial(self.fn, **args), limiter=limiter, abandon_on_cancel=True
        )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# -- validation -------------------------------------------------------------


def _json_type(value: Any) -> str:
    return next((name for t, name in _VALUE_TYPES if isinstance(value, t)), type(value).__name__)


def _types(schema: Mapping[str, Any]) -> list[str]:
    t = schema.get("type", [])
    return [t] if isinstance(t, str) else list(t)


def _allows_null(schema: Mapping[str, Any]) -> bool:
    return "null" in _types(schema)


def _expected(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    return " or ".join(_JSON_NAMES.get(t, t) for t in _types(schema))


def _label(path: str) -> str:
    return f"argument '{path}'"


def _same_enum_value(a: Any, b: Any) -> bool:
    # Type-aware: in Python True == 1 and 1 == 1.0, but not in a JSON enum.
    return type(a) is type(b) and a == b


def _check(schema: Mapping[str, Any], value: Any, path: str, problems: list[str]) -> Any:
    """Check one value; return it normalised (ints widened to floats where a
    number is expected, integral floats narrowed where an integer is)."""
    types_ = _types(schema)
    result: Any = _NO_MATCH
    for t in types_:
        result = _check_type(t, schema, value, path, problems)
        if result is not _NO_MATCH:
            break
    if result is _NO_MATCH:
        problems.append(f"{_label(path)} must be {_expected(schema)}, got {_json_type(value)}")
        return value
    if "enum" in schema and not any(_same_enum_value(result, v) for v in schema["enum"]):
        problems.append(f"{_label(path)} must be {_expected(schema)}, got {json.dumps(result)}")
    return result


_NO_MATCH: Any = object()


def _check_type(t: str, schema: Mapping[str, Any], value: Any, path: str, problems: list[str]) -> Any:
    if t == "null":
        return None if value is None else _NO_MATCH
    if t == "string":
        return value if isinstance(value, str) else _NO_MATCH
    if t == "boolean":
        return value if isinstance(value, bool) else _NO_MATCH
    if t == "integer":  # a model writing 3.0 meant 3
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if t == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _NO_MATCH
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            problems.append(f"{_label(path)} must be a finite number")
        return number
    if t == "array":
        if not isinstance(value, list):
            return _NO_MATCH
        if "items" not in schema:
            return list(value)
        return [_check(schema["items"], item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if t == "object":
        return _check_object(schema, value, path, problems) if isinstance(value, dict) else _NO_MATCH
    raise TypeError(f"schema type {t!r} is not supported by the tool validator")


def _check_object(schema: Mapping[str, Any], value: dict[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    def sub(key: str) -> str:
        return f"{path}[{json.dumps(key)}]" if path else key

    out: dict[str, Any] = {}
    properties: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key in schema.get("required", ()):
        if key not in value:
            problems.append(f"missing required {_label(sub(key))}")
    for key, item in value.items():
        if key in properties:
            out[key] = _check(properties[key], item, sub(key), problems)
        elif isinstance(extra, Mapping):
            out[key] = _check(extra, item, sub(key), problems)
        elif extra is False:
            known = ", ".join(properties) or "none: this takes no arguments"
            problems.append(f"unknown {_label(sub(key))} (known: {known})")
        else:
            out[key] = item
    return out


# -- schema derivation ------------------------------------------------------


def _schema_for(tp: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one annotation; TypeError for anything unsupported."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        schema = _schema_for(args[0], where)
        meta = args[1:]
        if not all(isinstance(m, str) for m in meta):
            raise TypeError(f"{where}: Annotated metadata must be description strings, got {meta!r}")
        schema["description"] = " ".join(m.strip() for m in meta)
        return schema
    if origin is Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return _nullable(_schema_for(others[0], where))
        raise TypeError(f"{where}: unsupported union {tp!r}; only T | None is supported ({_SUPPORTED})")
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is list:
        if len(args) != 1:
            raise TypeError(f"{where}: list needs an item type, e.g. list[str]")
        return {"type": "array", "items": _schema_for(args[0], f"{where} items")}
    if origin is dict:
        if len(args) != 2 or args[0] is not str:
            raise TypeError(f"{where}: dict must be dict[str, T] (JSON object keys are strings)")
        return {"type": "object", "additionalProperties": _schema_for(args[1], f"{where} values")}
    if origin is Literal:
        return _literal_schema(args, where)
    if tp in (list, dict):
        raise TypeError(f"{where}: bare {tp.__name__} needs its item types, e.g. list[str]")
    raise TypeError(f"{where}: unsupported annotation {tp!r}; supported: {_SUPPORTED}")


def _literal_schema(values: tuple[Any, ...], where: str) -> dict[str, Any]:
    json_type = {bool: "boolean", int: "integer", str: "string", type(None): "null"}
    found: list[str] = []
    for v in values:
        if type(v) not in json_type:
            raise TypeError(f"{where}: Literal values must be str, int, bool or None, got {v!r}")
        if json_type[type(v)] not in found:
            found.append(json_type[type(v)])
    return {"type": found[0] if len(found) == 1 else found, "enum": list(values)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    types_ = _types(schema)
    if "null" not in types_:
        schema["type"] = [*types_, "null"]
    if "enum" in schema and not any(v is None for v in schema["enum"]):
        schema["enum"] = [*schema["enum"], None]
    return schema


_SECTION_RE = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|"
    r"Attributes|See Also|Warnings?|Todo):\s*$"
)
_ARGS_RE = re.compile(r"^\s*(Args|Arguments|Parameters|Params):\s*$")
_ARG_LINE_RE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The first paragraph (joined to one line) and a Google-style ``Args:``
    section as {name: description}."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION_RE.match(line):
            break
        summary.append(line.strip())
    params: dict[str, str] = {}
    start = next((i for i, line in enumerate(lines) if _ARGS_RE.match(line)), None)
    if start is not None:
        header_indent = len(lines[start]) - len(lines[start].lstrip())
        entry_indent: int | None = None
        current: str | None = None
        for line in lines[start + 1 :]:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= header_indent:
                break
            if entry_indent is None:
                entry_indent = indent
            m = _ARG_LINE_RE.match(line.strip())
            if indent == entry_indent and m:
                current = m.group(1).lstrip("*")
                params[current] = m.group(2).strip()
            elif current is not None:
                params[current] = f"{params[current]} {line.strip()}".strip()
    return " ".join(summary), params


def _derive(fn: Callable[..., Any], name: str) -> tuple[str, dict[str, Any]]:
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise TypeError(f"tool {name!r}: cannot resolve annotations: {exc}") from exc
    summary, doc_params = _parse_docstring(inspect.getdoc(fn))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        where = f"tool {name!r} parameter {param.name!r}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{where}: *args, **kwargs and positional-only parameters are not supported")
        if param.name not in hints:
            raise TypeError(f"{where} has no type annotation")
        schema = _schema_for(hints[param.name], where)
        if "description" not in schema and doc_params.get(param.name):
            schema["description"] = doc_params[param.name]
        if param.default is not param.empty:
            try:
                default = json.loads(json.dumps(param.default))
            except (TypeError, ValueError):
                raise TypeError(f"{where}: default {param.default!r} is not JSON") from None
            problems: list[str] = []
            _check(schema, default, param.name, problems)
            if problems:
                raise TypeError(f"{where}: default {param.default!r} does not match the annotation ({problems[0]})")
            schema["default"] = default
        elif not _allows_null(schema):
            required.append(param.name)
        properties[param.name] = schema
    unknown = set(doc_params) - set(properties)
    if unknown:
        raise TypeError(f"tool {name!r}: docstring documents unknown parameters {sorted(unknown)}")
    return summary, {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@overload
def tool(fn: Callable[..., Any], *, name: str | None = ..., description: str | None = ...,
         timeout_s: float | None = ..., concurrency: int | None = ..., blocking: bool = ...,
         needs_approval: ApprovalRule = ...) -> Tool: ...
@overload
def tool(fn: None = None, *, name: str | None = ..., description: str | None = ...,
         timeout_s: float | None = ..., concurrency: int | None = ...,
         blocking: bool = ..., needs_approval: ApprovalRule = ...) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    concurrency: int | None = None,
    blocking: bool = True,
    needs_approval: ApprovalRule = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a :class:`Tool` from a typed function: ``@tool``, ``@tool(...)``
    or ``tool(fn, ...)``.

    The description is the docstring's first paragraph unless given;
    parameter descriptions come from ``Annotated[T, "..."]`` or the
    docstring's ``Args:`` section. Unsupported annotations raise TypeError
    here, at import time, rather than when a model first calls the tool.
    ``needs_approval`` (True, or a predicate on the checked arguments) makes
    each call wait for the user's approval before it runs.
    """

    def make(f: Callable[..., Any]) -> Tool:
        tool_name = name or getattr(f, "__name__", "")
        summary, parameters = _derive(f, tool_name)
        text = description if description is not None else summary
        if not text.strip():
            raise TypeError(f"tool {tool_name!r} needs a description: give it a docstring or description=")
        return Tool(name=tool_name, description=text.strip(), parameters=parameters, fn=f,
                    timeout_s=timeout_s, concurrency=concurrency, blocking=blocking,
                    needs_approval=needs_approval)  # fmt: skip

    return make if fn is None else make(fn)


# -- registry ---------------------------------------------------------------


def _index(tools: Iterable[Tool]) -> Mapping[str, Tool]:
    if isinstance(tools, Mapping):
        tools = tools.values()
    by_name: dict[str, Tool] = {}
    for t in tools:
        if not isinstance(t, Tool):
            raise TypeError(f"not a Tool: {t!r}")
        if t.name in by_name:
            raise ValueError(f"duplicate tool name {t.name!r}")
        by_name[t.name] = t
    return types.MappingProxyType(by_name)


@attrs.frozen(eq=False)
class ToolRegistry(Mapping[str, Tool]):
    """The tools a server offers, by name, in the order given. Immutable, so
    it is shared freely between runs; :meth:`merged` makes a new one."""

    _tools: Mapping[str, Tool] = attrs.field(default=(), converter=_index, alias="tools")

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __repr__(self) -> str:
        return f"ToolRegistry({list(self._tools)!r})"

    def specs(self, names: Iterable[str] | None = None) -> tuple[ToolSpec, ...]:
        """Specs of the named tools (all of them for None), in the order given.
        An unknown name raises KeyError: an agent configured with a tool the
        server lacks is a configuration error, not something to skip."""
        if names is None:
            return tuple(t.spec() for t in self._tools.values())
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._tools]
        if missing:
            raise KeyError(f"unknown tools {missing}; known: {sorted(self._tools)}")
        return tuple(self._tools[n].spec() for n in wanted)

    def merged(self, other_tools: Iterable[Tool]) -> ToolRegistry:
        """A new registry with these tools followed by ``other_tools``; a name
        present in both raises ValueError (no silent shadowing)."""
        others = other_tools.values() if isinstance(other_tools, Mapping) else other_tools
        return ToolRegistry([*self._tools.values(), *others])
