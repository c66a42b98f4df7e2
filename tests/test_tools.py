"""Tools: schema derivation, argument validation, invocation, built-ins, chaos."""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Annotated, Any, Literal, Optional

import pytest
import trio

from netra.errors import ToolError
from netra.models.base import ToolSpec
from netra.tools import Tool, ToolArgumentsError, ToolRegistry, builtin_tools, chaos_tools, tool


def schema_of(fn: Any) -> dict[str, Any]:
    return tool(fn).parameters


def obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def by_name(name: str) -> Tool:
    return {t.name: t for t in builtin_tools() + chaos_tools()}[name]


async def run(name: str, **args: Any) -> Any:
    t = by_name(name)
    return await t.invoke(t.parse_arguments(json.dumps(args)))


# -- schema derivation --------------------------------------------------------


def test_scalar_types() -> None:
    def f(s: str, i: int, x: float, b: bool) -> None:
        """Doc."""

    assert schema_of(f) == obj(
        {"s": {"type": "string"}, "i": {"type": "integer"}, "x": {"type": "number"}, "b": {"type": "boolean"}},
        ["s", "i", "x", "b"],
    )


def test_containers() -> None:
    def f(a: list[int], m: dict[str, float], nested: list[dict[str, list[str]]]) -> None:
        """Doc."""

    assert schema_of(f) == obj(
        {
            "a": {"type": "array", "items": {"type": "integer"}},
            "m": {"type": "object", "additionalProperties": {"type": "number"}},
            "nested": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
            },
        },
        ["a", "m", "nested"],
    )


def test_literal_enum() -> None:
    def f(mode: Literal["fast", "slow"], level: Literal[1, 2, 3], mixed: Literal["a", 1]) -> None:
        """Doc."""

    assert schema_of(f) == obj(
        {
            "mode": {"type": "string", "enum": ["fast", "slow"]},
            "level": {"type": "integer", "enum": [1, 2, 3]},
            "mixed": {"type": ["string", "integer"], "enum": ["a", 1]},
        },
        ["mode", "level", "mixed"],
    )


def test_optional_and_defaults() -> None:
    def f(
        a: int | None,
        b: Optional[str],  # noqa: UP045 - the typing spelling must work too
        c: int = 3,
        d: Literal["x", "y"] | None = None,
        e: list[str] = ["k"],  # noqa: B006 - never mutated
    ) -> None:
        """Doc."""

    assert schema_of(f) == obj(
        {
            "a": {"type": ["integer", "null"]},
            "b": {"type": ["string", "null"]},
            "c": {"type": "integer", "default": 3},
            "d": {"type": ["string", "null"], "enum": ["x", "y", None], "default": None},
            "e": {"type": "array", "items": {"type": "string"}, "default": ["k"]},
        },
        [],
    )


def test_descriptions_from_annotated_and_docstring() -> None:
    def f(
        q: Annotated[str, "What to look for."],
        n: int,
        tags: Annotated[list[str], "Labels."] | None = None,
    ) -> None:
        """Search the catalogue
        for things.

        Longer explanation that the model does not need.

        Args:
            q: Ignored: Annotated wins.
            n (int): How many results,
                at most 10.
        """

    t = tool(f)
    assert t.name == "f"
    assert t.description == "Search the catalogue for things."
    assert t.parameters == obj(
        {
            "q": {"type": "string", "description": "What to look for."},
            "n": {"type": "integer", "description": "How many results, at most 10."},
            "tags": {"type": ["array", "null"], "items": {"type": "string"}, "description": "Labels.", "default": None},
        },
        ["q", "n"],
    )


def test_decorator_forms_and_spec() -> None:
    @tool
    def plain(x: int) -> int:
        """Plain."""
        return x

    @tool(name="renamed", description="Given.", timeout_s=2.5, concurrency=3)
    async def fancy() -> None:
        """Ignored."""

    assert isinstance(plain, Tool) and not plain.is_async and plain.timeout_s is None and plain.concurrency is None
    assert (fancy.name, fancy.description, fancy.is_async, fancy.timeout_s, fancy.concurrency) == (
        "renamed", "Given.", True, 2.5, 3,
    )
    spec = plain.spec()
    assert spec == ToolSpec(name="plain", description="Plain.", parameters=plain.parameters)
    spec.parameters["properties"].clear()  # a copy: the tool is unaffected
    assert "x" in plain.parameters["properties"]


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (Any, "unsupported annotation"),
        (int | str, "only T | None"),
        (list, "needs its item types"),
        (dict[int, str], "dict[str, T]"),
        (tuple[int, int], "unsupported annotation"),
        (Literal[1.5], "Literal values"),
        (Annotated[int, 5], "description strings"),
        (bytes, "unsupported annotation"),
    ],
)
def test_unsupported_annotations(annotation: Any, message: str) -> None:
    def f(x):  # type: ignore[no-untyped-def]
        """Doc."""

    f.__annotations__ = {"x": annotation}
    with pytest.raises(TypeError, match=message):
        tool(f)


def test_decoration_errors() -> None:
    def unannotated(x) -> None:  # type: ignore[no-untyped-def]
        """Doc."""

    def star(*args: int) -> None:
        """Doc."""

    def undocumented(x: int) -> None:
        pass

    def bad_default(x: int = None) -> None:  # type: ignore[assignment]
        """Doc."""

    def wrong_doc(x: int) -> None:
        """Doc.

        Args:
            y: Not a parameter.
        """

    for fn, message in [
        (unannotated, "no type annotation"),
        (star, r"\*args"),
        (undocumented, "needs a description"),
        (bad_default, "does not match"),
        (wrong_doc, "unknown parameters"),
    ]:
        with pytest.raises(TypeError, match=message):
            tool(fn)
    with pytest.raises(ValueError, match="must match"):
        tool(lambda: None, name="has space", description="x")
    with pytest.raises(ValueError, match="concurrency must be a positive int"):
        tool(lambda: None, name="ok", description="x", concurrency=0)


# -- validation ---------------------------------------------------------------


@tool
def sample(
    x: float,
    n: int,
    flag: bool,
    mode: Literal["a", "b"],
    items: list[int],
    tag: str | None,
    weights: dict[str, float] | None = None,
    note: str | None = None,
    count: int = 1,
) -> dict[str, Any]:
    """A tool with one of everything."""
    return locals()


def problems(raw: str) -> str:
    with pytest.raises(ToolArgumentsError) as info:
        sample.parse_arguments(raw)
    assert isinstance(info.value, ToolError) and info.value.code == "tool_error"
    return info.value.message


GOOD = {"x": 1.5, "n": 2, "flag": True, "mode": "a", "items": [1, 2]}


def test_valid_arguments_are_normalised() -> None:
    args = sample.parse_arguments(json.dumps({**GOOD, "x": 2, "n": 3.0, "weights": {"w": 1}}))
    assert args == {**GOOD, "x": 2.0, "n": 3, "weights": {"w": 1.0}, "tag": None}
    assert type(args["x"]) is float and type(args["n"]) is int and type(args["weights"]["w"]) is float
    assert "count" not in args and "note" not in args  # the function's own defaults apply


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": "1"}, "argument 'x' must be a number, got string"),
        ({"x": True}, "argument 'x' must be a number, got boolean"),
        ({"n": 1.5}, "argument 'n' must be an integer, got number"),
        ({"n": False}, "argument 'n' must be an integer, got boolean"),
        ({"flag": 1}, "argument 'flag' must be true or false, got integer"),
        ({"mode": "c"}, 'argument \'mode\' must be one of "a", "b", got "c"'),
        ({"items": [1, "2"]}, "argument 'items[1]' must be an integer, got string"),
        ({"items": 1}, "argument 'items' must be a list, got integer"),
        ({"weights": {"w": "heavy"}}, 'argument \'weights["w"]\' must be a number, got string'),
        ({"x": None}, "argument 'x' must be a number, got null"),
        ({"z": 1}, "unknown argument 'z' (known: x, n, flag, mode, items, tag, weights, note, count)"),
        ({"x": 1e400}, "argument 'x' must be a finite number"),
    ],
)
def test_validation_messages(change: dict[str, Any], message: str) -> None:
    raw = json.dumps({**GOOD, **change}).replace("Infinity", "1e400")
    assert message in problems(raw)


def test_missing_arguments_are_all_reported() -> None:
    message = problems('{"x": 1}')
    assert message == (
        "missing required argument 'n'; missing required argument 'flag'; "
        "missing required argument 'mode'; missing required argument 'items'"
    )


def test_malformed_json() -> None:
    assert problems('{"x": ').startswith("arguments are not valid JSON")
    assert problems("[1, 2]") == "arguments must be a JSON object, got list"
    assert "not a JSON number" in problems('{"x": NaN}')
    assert "not valid JSON" in problems('{"n": ' + "9" * 5000 + "}")


def test_empty_arguments_for_a_tool_without_parameters() -> None:
    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    assert ping.parse_arguments("") == {} == ping.parse_arguments("  {} ")
    with pytest.raises(ToolArgumentsError, match="this takes no arguments"):
        ping.parse_arguments('{"a": 1}')


# -- invocation ---------------------------------------------------------------


async def test_sync_tool_runs_in_a_worker_thread() -> None:
    @tool
    def where(x: int) -> tuple[int, bool]:
        """Which thread."""
        return x * 2, threading.current_thread() is threading.main_thread()

    assert await where.invoke({"x": 21}) == (42, False)
    assert await where.invoke({"x": 1}, limiter=trio.CapacityLimiter(1)) == (2, False)


async def test_async_tool_is_awaited_and_exceptions_propagate() -> None:
    @tool
    async def double(x: int) -> int:
        """Double."""
        await trio.sleep(0)
        return 2 * x

    assert double.is_async
    assert await double.invoke({"x": 4}) == 8
    with pytest.raises(RuntimeError, match="chaos: fail"):
        await by_name("fail").invoke({})


async def test_cancelled_hanging_async_tool_returns_promptly(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    with trio.move_on_after(5) as scope:
        await by_name("hang").invoke({})
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(5)


async def test_cancelled_blocking_sync_tool_is_abandoned() -> None:
    release = threading.Event()

    @tool
    def stuck() -> None:
        """Blocks until released."""
        release.wait(10)

    began = time.monotonic()
    with trio.move_on_after(0.05) as scope:
        await stuck.invoke({})
    assert scope.cancelled_caught and time.monotonic() - began < 2
    release.set()


async def test_chaos_sleep_and_big(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    assert await run("sleep", ms=1500) == {"slept_ms": 1500}
    assert trio.current_time() - start == pytest.approx(1.5)
    assert await run("big", bytes=1000) == "x" * 1000
    with pytest.raises(ToolError, match="between 0 and 16777216"):
        await run("big", bytes=16 * 1024 * 1024 + 1)
    assert {t.name for t in chaos_tools()} == {"fail", "hang", "sleep", "big"}
    assert all(t.is_async for t in chaos_tools())


# -- registry -----------------------------------------------------------------


def test_registry() -> None:
    tools = builtin_tools()
    registry = ToolRegistry(tools)
    assert "calculator" in registry and "nope" not in registry
    assert registry.get("calculator") is tools[0] and registry.get("nope") is None
    assert list(registry) == [t.name for t in tools] and len(registry) == len(tools)
    assert [s.name for s in registry.specs(["unit_convert", "calculator"])] == ["unit_convert", "calculator"]
    assert len(registry.specs()) == len(tools)
    with pytest.raises(KeyError, match="nope"):
        registry.specs(["nope"])
    merged = registry.merged(chaos_tools())
    assert "hang" in merged and "hang" not in registry
    with pytest.raises(ValueError, match="duplicate tool name 'calculator'"):
        ToolRegistry([*tools, *builtin_tools()])
    with pytest.raises(ValueError, match="duplicate"):
        merged.merged(chaos_tools())
    with pytest.raises(TypeError):
        ToolRegistry([lambda: None])  # type: ignore[list-item]
    with pytest.raises(AttributeError):
        registry._tools = {}  # type: ignore[misc]


# -- calculator ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("-3 ** 2", -9),
        ("+4", 4),
        ("sqrt(16) + abs(-2)", 6.0),
        ("log(e)", 1.0),
        ("log(8, 2)", 3.0),
        ("log10(1000)", 3.0),
        ("exp(0) + sin(0) + cos(0) + tan(0)", 2.0),
        ("round(2.567, 2)", 2.57),
        ("min(3, 1, 2) + max(3, 1, 2)", 4),
        ("min(2.5)", 2.5),
        ("floor(2.7) + ceil(2.1)", 5),
        ("2 * pi", 2 * math.pi),
        ("1.5e3", 1500.0),
        ("2 ** 1000", 2**1000),
        ("+".join(["1.5"] * 120), 180.0),
    ],
)
async def test_calculator(expression: str, expected: float) -> None:
    result = await run("calculator", expression=expression)
    assert result == pytest.approx(expected) and type(result) is type(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("2 ** 10 ** 10", "too large"),
        ("9 ** 9 ** 9", "too large"),
        ("*".join(["99999999999"] * 40), "too large"),
        ("10.0 ** 400", "too large"),
        ("1e308 * 10", "too large"),
        ("exp(1000)", "too large"),
        ("round(5, -1000000000)", "digits"),
        ("factorial(100000)", "unknown function 'factorial'"),
        ("().__class__", "not allowed"),
        ("(1).__class__.__bases__", "not allowed"),
        ("__import__('os')", "unknown function '__import__'"),
        ("os", "unknown name 'os'"),
        ("(lambda: 1)()", "not allowed"),
        ("[x for x in range(10 ** 9)]", "not allowed"),
        ("sum(x for x in [1])", "unknown function 'sum'"),
        ("'a' * 10", "is not a number"),
        ("True + 1", "is not a number"),
        ("1j", "is not a number"),
        ("2 ^ 3", "use ** for powers"),
        ("1 < 2", "not allowed"),
        ("sqrt(-1)", "math domain error"),
        ("(-8) ** (1/3)", "no real result"),
        ("pi(2)", "unknown function 'pi'"),
        ("sqrt(x=4)", "not allowed"),
        ("max()", "takes 1 to 100 arguments"),
        ("1 +", "not a valid expression"),
        ("1" * 501, "too long"),
        ("-" * 400 + "1", "nested too deeply"),
    ],
)
async def test_calculator_refusals(expression: str, message: str) -> None:
    began = time.monotonic()
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace("*", r"\*")):
        await run("calculator", expression=expression)
    assert time.monotonic() - began < 1


# -- the other built-ins ------------------------------------------------------


async def test_statistics() -> None:
    result = await run("statistics", values=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert result == {
        "count": 10, "sum": 55.0, "mean": 5.5, "median": 5.5, "stdev": pytest.approx(3.0276503540974917),
        "min": 1.0, "max": 10.0, "p90": pytest.approx(9.1), "p95": pytest.approx(9.55), "p99": pytest.approx(9.91),
    }  # fmt: skip
    single = await run("statistics", values=[4])
    assert (single["mean"], single["median"], single["stdev"], single["p99"]) == (4.0, 4.0, None, 4.0)
    with pytest.raises(ToolError, match="empty"):
        await run("statistics", values=[])
    with pytest.raises(ToolError, match="overflow"):
        await run("statistics", values=[1e308, 1e308, -1e308])


async def test_correlation() -> None:
    result = await run("correlation", x=[1, 2, 3, 4], y=[3, 5, 7, 9])
    assert result == {
        "n": 4, "slope": 2.0, "intercept": 1.0, "r": pytest.approx(1.0), "r_squared": pytest.approx(1.0),
        "strength": "strong positive",
    }  # fmt: skip
    falling = await run("correlation", x=[1, 2, 3], y=[3, 2, 1])
    assert falling["r"] == pytest.approx(-1.0) and falling["strength"] == "strong negative"
    noisy = await run("correlation", x=[1, 2, 3, 4, 5], y=[2, 1, 4, 3, 5])
    assert noisy["r"] == pytest.approx(0.8) and noisy["slope"] == pytest.approx(0.8)
    assert noisy["intercept"] == pytest.approx(0.6)
    flat = await run("correlation", x=[1, 2, 3], y=[5, 5, 5])
    assert (flat["r"], flat["slope"], flat["intercept"]) == (None, 0.0, 5.0)
    with pytest.raises(ToolError, match="same length"):
        await run("correlation", x=[1, 2], y=[1])
    with pytest.raises(ToolError, match="x is constant"):
        await run("correlation", x=[2, 2], y=[1, 3])


async def test_llm_cost_estimate() -> None:
    result = await run(
        "llm_cost_estimate", model="GPT-4o-mini", prompt_tokens=1000, completion_tokens=500, requests_per_day=10_000
    )
    # 1000 * 0.15 / 1e6 + 500 * 0.60 / 1e6 = 0.00045 per request.
    assert result["cost_per_request_usd"] == pytest.approx(0.00045)
    assert result["cost_per_day_usd"] == pytest.approx(4.5)
    assert result["cost_per_month_usd"] == pytest.approx(135.0)
    assert result["model"] == "gpt-4o-mini" and "2025-06" in result["note"]
    one = await run("llm_cost_estimate", model="claude-sonnet-4", prompt_tokens=1_000_000, completion_tokens=0)
    assert one["cost_per_day_usd"] == pytest.approx(3.0)
    with pytest.raises(ToolError, match="unknown model 'gpt-9'; known: gpt-4o, "):
        await run("llm_cost_estimate", model="gpt-9", prompt_tokens=1, completion_tokens=1)


async def test_throughput_plan() -> None:
    result = await run(
        "throughput_plan",
        tokens_per_second=50,
        output_tokens=500,
        concurrency=8,
        time_to_first_token_ms=500,
        target_requests_per_second=2,
    )
    # 0.5 s to the first token + 500 / 50 = 10 s streaming: 10.5 s per request;
    # 8 in flight / 10.5 s = 0.762 req/s; 2 req/s needs 2 * 10.5 = 21 in flight.
    assert result["latency_per_request_s"] == pytest.approx(10.5)
    assert result["generation_time_s"] == pytest.approx(10.0)
    assert result["requests_per_second"] == pytest.approx(8 / 10.5)
    assert result["requests_per_minute"] == pytest.approx(8 / 10.5 * 60)
    assert result["requests_per_day"] == pytest.approx(8 / 10.5 * 86_400)
    assert result["output_tokens_per_second_total"] == pytest.approx(8 / 10.5 * 500)
    assert result["concurrency_needed"] == 21
    plain = await run("throughput_plan", tokens_per_second=100, output_tokens=300, concurrency=3)
    assert plain["requests_per_second"] == pytest.approx(1.0) and "concurrency_needed" not in plain
    odd = await run("throughput_plan", tokens_per_second=10, output_tokens=30, concurrency=1, target_requests_per_second=0.7)
    assert odd["concurrency_needed"] == 3  # 0.7 * 3 s = 2.1 -> 3
    with pytest.raises(ToolError, match="tokens_per_second must be positive"):
        await run("throughput_plan", tokens_per_second=0, output_tokens=1, concurrency=1)


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (1500, "ms", "s", 1.5),
        (2, "hours", "min", 120),
        (1, "d", "s", 86_400),
        (250, "us", "ms", 0.25),
        (1, "GiB", "MiB", 1024),
        (1, "GB", "B", 1e9),
        (1, "GiB", "GB", 1.073741824),
        (100, "Mbit", "MB", 12.5),
        (3, "bytes", "bit", 24),
    ],
)
async def test_unit_convert(value: float, source: str, target: str, expected: float) -> None:
    result = await run("unit_convert", value=value, from_unit=source, to_unit=target)
    assert result["value"] == pytest.approx(expected)


async def test_unit_convert_refusals() -> None:
    with pytest.raises(ToolError, match="cannot convert time"):
        await run("unit_convert", value=1, from_unit="s", to_unit="MB")
    with pytest.raises(ToolError, match="ambiguous unit 'Mb': write MB for bytes or Mbit for bits"):
        await run("unit_convert", value=1, from_unit="Mb", to_unit="B")
    with pytest.raises(ToolError, match="unknown unit 'parsec'"):
        await run("unit_convert", value=1, from_unit="parsec", to_unit="s")


async def test_current_time() -> None:
    utc = await run("current_time")
    assert utc["timezone"] == "UTC" and utc["utc_offset"] == "+00:00"
    assert abs(utc["unix"] - time.time()) < 5
    fixed = await run("current_time", timezone="Etc/GMT+5")  # POSIX sign: five hours behind UTC
    assert fixed["utc_offset"] == "-05:00" and fixed["iso"].endswith("-05:00")
    assert abs(fixed["unix"] - utc["unix"]) < 5
    india = await run("current_time", timezone="Asia/Kolkata")
    assert india["utc_offset"] == "+05:30"
    assert (await run("current_time", timezone="utc"))["timezone"] == "UTC"
    for bad in ("Mars/Olympus", "../../etc/passwd", "/etc/passwd", "America", "", "x" * 5000):
        with pytest.raises(ToolError, match="unknown time zone"):
            await run("current_time", timezone=bad)


def test_builtin_tools_are_fresh_and_documented() -> None:
    first, second = builtin_tools(), builtin_tools()
    assert [t.name for t in first] == [
        "calculator", "statistics", "correlation", "llm_cost_estimate", "throughput_plan", "unit_convert", "current_time",
    ]  # fmt: skip
    assert all(a is not b for a, b in zip(first, second, strict=True))
    for t in first:
        assert t.description and not t.is_async
        assert all(p.get("description") for p in t.parameters["properties"].values()), t.name
    ToolRegistry(first + chaos_tools())  # no name clashes


# -- approval ---------------------------------------------------------------


def test_needs_approval_is_a_flag_or_a_predicate() -> None:
    def pay(amount: int) -> int:
        """Pay."""
        return amount

    assert tool(pay).needs_approval is False
    assert tool(pay, needs_approval=True).needs_approval is True
    big = lambda args: args["amount"] > 100  # noqa: E731
    assert tool(pay, needs_approval=big).needs_approval is big
    with pytest.raises(TypeError, match="needs_approval"):
        tool(pay, needs_approval="yes")  # type: ignore[arg-type]


def test_check_arguments_checks_a_decoded_object_like_the_models_text() -> None:
    def pay(amount: int, to: str, note: str | None, rate: float = 1.0) -> None:
        """Pay."""

    t = tool(pay)
    assert t.check_arguments({"amount": 3.0, "to": "bo", "rate": 2}) == {
        "amount": 3, "to": "bo", "rate": 2.0, "note": None,
    }
    with pytest.raises(ToolArgumentsError) as refused:
        t.check_arguments({"amount": "3", "who": "bo"})
    assert refused.value.problems == (
        "missing required argument 'to'",
        "argument 'amount' must be an integer, got string",
        "unknown argument 'who' (known: amount, to, note, rate)",
    )
