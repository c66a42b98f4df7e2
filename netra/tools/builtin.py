"""The tools every netra server offers: offline, deterministic, cheap.

They serve the bundled agents (data analysis, cost and latency planning) and
double as examples of writing tools: a typed function whose docstring's first
paragraph is what the model reads, with arguments checked against the derived
schema before the function runs. Failures a model can fix raise ToolError
with a message saying how.

All are synchronous and CPU-bound, so they run in worker threads; each bounds
its own work (expression size, list length, integer size) so that no input a
model can produce keeps a thread busy for long.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
import re
import types
import zoneinfo
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from netra.errors import ToolError

from .base import Tool, tool

# -- calculator -------------------------------------------------------------

_MAX_EXPRESSION_CHARS = 500
#: Recursion guard; generous because a plain sum of n terms nests n deep.
_MAX_DEPTH = 300
#: Integers are kept within the range of a float (about 1.8e308): beyond it
#: no float arithmetic works anyway, and a bound per operation keeps every
#: step cheap however the expression is built.
_MAX_INT_BITS = 1024
_MAX_ROUND_DIGITS = 100
_MAX_FN_ARGS = 100

_CONSTANTS = types.MappingProxyType({"pi": math.pi, "e": math.e})
#: name -> (function, min args, max args)
_FUNCTIONS: types.MappingProxyType[str, tuple[Callable[..., Any], int, int]] = types.MappingProxyType(
    {"sqrt": (math.sqrt, 1, 1), "log": (math.log, 1, 2), "log10": (math.log10, 1, 1), "exp": (math.exp, 1, 1),
     "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1), "abs": (abs, 1, 1),
     "round": (round, 1, 2), "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1),
     # min(x) is x, not "'int' object is not iterable"
     "min": (lambda *a: min(a), 1, _MAX_FN_ARGS), "max": (lambda *a: max(a), 1, _MAX_FN_ARGS)}
)  # fmt: skip
_BINARY: types.MappingProxyType[type[ast.operator], Callable[[Any, Any], Any]] = types.MappingProxyType(
    {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
     ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
)  # fmt: skip
_ALLOWED = (
    "numbers, + - * / // % **, parentheses, the constants pi and e, and the functions "
    + ", ".join(_FUNCTIONS)
)


def _short(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ToolError("number too large: results are limited to about 1e308")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("number too large: results are limited to about 1e308")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # Refuse before computing: 2**10**10 would otherwise run for minutes.
        if abs(base) >= 2 and exponent * math.log2(abs(base)) > _MAX_INT_BITS:
            raise ToolError("number too large: results are limited to about 1e308")
        return base**exponent
    if base == 0 and exponent < 0:
        raise ToolError("division by zero (0 to a negative power)")
    try:
        return math.pow(base, exponent)
    except ValueError:
        raise ToolError("a negative number to a fractional power has no real result") from None


def _evaluate(node: ast.AST, depth: int = 0) -> int | float:
    if depth > _MAX_DEPTH:
        raise ToolError("expression nested too deeply")
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"{_short(node)} is not a number; allowed: {_ALLOWED}")
        return _bounded(node.value)
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ToolError(f"unknown name {node.id!r}; allowed: {_ALLOWED}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise ToolError("use ** for powers (^ is not supported)")
        if not isinstance(node.op, ast.Pow) and type(node.op) not in _BINARY:
            raise ToolError(f"operator in {_short(node)!r} is not supported; allowed: {_ALLOWED}")
        left = _evaluate(node.left, depth + 1)
        right = _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _call(node, depth)
    raise ToolError(f"{_short(node)!r} is not allowed; allowed: {_ALLOWED}")


def _call(node: ast.Call, depth: int) -> int | float:
    if not isinstance(node.func, ast.Name) or node.keywords:
        raise ToolError(f"{_short(node)!r} is not allowed; allowed: {_ALLOWED}")
    name = node.func.id
    if name not in _FUNCTIONS:
        raise ToolError(f"unknown function {name!r}; allowed: {_ALLOWED}")
    fn, low, high = _FUNCTIONS[name]
    if not low <= len(node.args) <= high or any(isinstance(a, ast.Starred) for a in node.args):
        count = f"{low}" if low == high else f"{low} to {high}"
        raise ToolError(f"{name}() takes {count} arguments")
    args = [_evaluate(a, depth + 1) for a in node.args]
    if name == "round" and len(args) == 2:
        # round(5, -10**9) would compute 10**(10**9): bound the digits.
        if not isinstance(args[1], int) or abs(args[1]) > _MAX_ROUND_DIGITS:
            raise ToolError(f"round()'s digits must be an integer within ±{_MAX_ROUND_DIGITS}")
    try:
        return _bounded(fn(*args))
    except ValueError:
        raise ToolError(f"math domain error in {_short(node)}") from None


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly, e.g. "(3.5 + 2) * 4 ** 2 / sqrt(2)". Supports
    numbers, + - * / // % ** and parentheses, the constants pi and e, and sqrt, log (natural, or
    log(x, base)), log10, exp, sin, cos, tan (radians), abs, round, min, max, floor, ceil.

    Args:
        expression: The expression; Python syntax, ** for powers.

    The expression is parsed with ``ast`` and walked over a whitelist: no
    eval, no names or attributes beyond the table, and every intermediate
    result bounded, so a model cannot use it to run code or burn CPU.
    """
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression too long (max {_MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        message = getattr(exc, "msg", None) or str(exc)
        raise ToolError(f"not a valid expression: {message}") from None
    try:
        return _evaluate(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("number too large: results are limited to about 1e308") from None


# -- data analysis ----------------------------------------------------------

_MAX_VALUES = 1_000_000


def _percentile(ordered: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, Excel's
    PERCENTILE.INC): the value at position p * (n - 1)."""
    position = p * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _finite_result(result: dict[str, Any]) -> dict[str, Any]:
    if any(isinstance(v, float) and not math.isfinite(v) for v in result.values()):
        raise ToolError("values too large to summarise (results overflow)")
    return result


def statistics(values: list[float]) -> dict[str, Any]:
    """Summarise a list of numbers: count, sum, mean, median, sample standard deviation, min, max and
    the 90th, 95th and 99th percentiles.

    Args:
        values: The numbers, e.g. latencies in ms.

    Percentiles interpolate linearly between closest ranks, the convention
    of numpy and spreadsheets, so the answers match what a user checks with.
    """
    n = len(values)
    if n == 0:
        raise ToolError("values is empty: give at least one number")
    if n > _MAX_VALUES:
        raise ToolError(f"too many values (max {_MAX_VALUES})")
    ordered = sorted(values)
    try:
        mean = math.fsum(ordered) / n
        stdev = math.sqrt(math.fsum((v - mean) * (v - mean) for v in ordered) / (n - 1)) if n > 1 else None
        summary = {"count": n, "sum": math.fsum(ordered), "mean": mean, "median": _percentile(ordered, 0.5),
                   "stdev": stdev, "min": ordered[0], "max": ordered[-1]}  # fmt: skip
        summary.update((f"p{p}", _percentile(ordered, p / 100)) for p in (90, 95, 99))
        return _finite_result(summary)
    except (OverflowError, ValueError):  # fsum: overflow, or inf - inf
        raise ToolError("values too large to summarise (results overflow)") from None


def _strength(r: float) -> str:
    size = abs(r)
    label = "negligible" if size < 0.1 else "weak" if size < 0.3 else "moderate" if size < 0.5 else "strong"
    if label == "negligible":
        return label
    return f"{label} {'positive' if r > 0 else 'negative'}"


def correlation(x: list[float], y: list[float]) -> dict[str, Any]:
    """Pearson correlation between two equally long lists of numbers, with the least-squares line y =
    slope * x + intercept.

    Args:
        x: The first variable (the predictor for the fitted line).
        y: The second variable, paired with x by position.

    r is reported with a conventional strength label (Cohen: below 0.1
    negligible, 0.3 weak, 0.5 moderate, above strong) because a model tends to
    over-read small correlations otherwise.
    """
    n = len(x)
    if n != len(y):
        raise ToolError(f"x and y must be the same length (got {n} and {len(y)})")
    if n < 2:
        raise ToolError("need at least two (x, y) pairs")
    if n > _MAX_VALUES:
        raise ToolError(f"too many values (max {_MAX_VALUES})")
    try:
        mx, my = math.fsum(x) / n, math.fsum(y) / n
        sxx = math.fsum((a - mx) * (a - mx) for a in x)
        syy = math.fsum((b - my) * (b - my) for b in y)
        sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    except (OverflowError, ValueError):  # fsum: overflow, or inf - inf
        raise ToolError("values too large (results overflow)") from None
    if sxx == 0:
        raise ToolError("x is constant: correlation and slope are undefined")
    slope = sxy / sxx
    result: dict[str, Any] = {"n": n, "slope": slope, "intercept": my - slope * mx}
    if syy == 0:
        result.update(r=None, r_squared=None, strength="undefined: y is constant")
    else:
        scale = math.sqrt(sxx * syy)  # one sqrt: exact for exact data (r = 1.0, not 0.9999999999999998)
        if not math.isfinite(scale):
            scale = math.sqrt(sxx) * math.sqrt(syy)
        r = max(-1.0, min(1.0, sxy / scale))
        result.update(r=r, r_squared=r * r, strength=_strength(r))
    return _finite_result(result)


# -- cost and latency planning ----------------------------------------------

#: Illustrative list prices in USD per 1M tokens (input, output), standard
#: tier, no caching or batch discounts, as published by the providers around
#: June 2025. Prices change; the tool says so in its answer.
PRICES_AS_OF = "2025-06"
_PRICES: types.MappingProxyType[str, tuple[float, float]] = types.MappingProxyType(
    {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60),
     "claude-opus-4": (15.00, 75.00), "claude-sonnet-4": (3.00, 15.00), "claude-3-5-haiku": (0.80, 4.00),
     "gemini-2.0-flash": (0.10, 0.40)}
)  # fmt: skip
_DAYS_PER_MONTH = 30
#: Counts beyond this are typos, and would overflow float arithmetic if huge.
_MAX_COUNT = 10**12
_MODEL_HELP = "Model name, one of: " + ", ".join(_PRICES)


def llm_cost_estimate(
    model: Annotated[str, _MODEL_HELP],
    prompt_tokens: Annotated[int, "Input tokens per request"],
    completion_tokens: Annotated[int, "Output tokens per request"],
    requests_per_day: Annotated[int, "Requests per day"] = 1,
) -> dict[str, Any]:
    """Estimate what an LLM workload costs per request, per day and per 30-day month, from illustrative
    list prices (USD per 1M tokens, mid-2025) of a few well-known models.

    The table is small and dated on purpose: it is for comparing options and
    orders of magnitude, and the answer says to check current prices.
    """
    key = model.strip().lower()
    if key not in _PRICES:
        raise ToolError(f"unknown model {model!r}; known: {', '.join(_PRICES)}")
    if not all(0 <= v <= _MAX_COUNT for v in (prompt_tokens, completion_tokens, requests_per_day)):
        raise ToolError(f"token counts and requests_per_day must be between 0 and {_MAX_COUNT}")
    input_price, output_price = _PRICES[key]
    per_request = (prompt_tokens * input_price + completion_tokens * output_price) / 1_000_000
    per_day = per_request * requests_per_day
    return {
        "model": key,
        "input_usd_per_1m_tokens": input_price,
        "output_usd_per_1m_tokens": output_price,
        # Rounded only to drop float noise (0.00045000000000000004).
        "cost_per_request_usd": round(per_request, 10),
        "cost_per_day_usd": round(per_day, 8),
        "cost_per_month_usd": round(per_day * _DAYS_PER_MONTH, 6),
        "note": f"illustrative list prices as of {PRICES_AS_OF}, no caching or batch discounts; check current prices",
    }


def throughput_plan(
    tokens_per_second: Annotated[float, "Output tokens per second of a single request's stream"],
    output_tokens: Annotated[int, "Output tokens per request"],
    concurrency: Annotated[int, "Requests in flight at once"],
    time_to_first_token_ms: Annotated[float, "Time until the first token (queueing + prompt processing), ms"] = 0.0,
    target_requests_per_second: Annotated[float | None, "Throughput to plan for; gives the concurrency needed"] = None,
) -> dict[str, Any]:
    """Plan latency and throughput of an LLM workload: time per request, requests per second/minute/day
    and total output tokens per second at a given concurrency, and optionally the concurrency needed
    for a target request rate.

    Model: a request waits time_to_first_token_ms, then streams all of its
    output_tokens at tokens_per_second; throughput follows from Little's law
    (requests per second = concurrency / latency), assuming per-request speed
    holds at that concurrency (measure it there: servers slow down as batches
    grow).
    """
    if tokens_per_second <= 0:
        raise ToolError("tokens_per_second must be positive")
    if not (0 <= output_tokens <= _MAX_COUNT and 0 <= time_to_first_token_ms <= _MAX_COUNT):
        raise ToolError(f"output_tokens and time_to_first_token_ms must be between 0 and {_MAX_COUNT}")
    if not 1 <= concurrency <= _MAX_COUNT:
        raise ToolError(f"concurrency must be between 1 and {_MAX_COUNT}")
    decode_s = output_tokens / tokens_per_second
    latency_s = time_to_first_token_ms / 1000 + decode_s
    if latency_s <= 0:
        raise ToolError("a request takes no time: give output_tokens or time_to_first_token_ms")
    rps = concurrency / latency_s
    result: dict[str, Any] = {
        "latency_per_request_s": latency_s,
        "time_to_first_token_s": time_to_first_token_ms / 1000,
        "generation_time_s": decode_s,
        "requests_per_second": rps,
        "requests_per_minute": rps * 60,
        "requests_per_day": rps * 86_400,
        "output_tokens_per_second_total": rps * output_tokens,
    }
    if target_requests_per_second is not None:
        if target_requests_per_second <= 0:
            raise ToolError("target_requests_per_second must be positive")
        # Round away float noise before the ceiling: 2.0000000001 needs 2, not 3.
        result["concurrency_needed"] = math.ceil(round(target_requests_per_second * latency_s, 9))
    return result


# -- conversions and time ---------------------------------------------------

#: unit -> (dimension, size in the dimension's base unit: seconds or bytes)
_UNITS: types.MappingProxyType[str, tuple[str, float]] = types.MappingProxyType(
    {
        **{u: ("time", size) for u, size in (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("min", 60.0),
                                            ("h", 3600.0), ("d", 86_400.0), ("week", 604_800.0))},
        **{u: ("data", size) for u, size in (("bit", 0.125), ("kbit", 125.0), ("Mbit", 125e3), ("Gbit", 125e6),
                                            ("Tbit", 125e9), ("B", 1.0), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9),
                                            ("TB", 1e12), ("KiB", 2.0**10), ("MiB", 2.0**20), ("GiB", 2.0**30),
                                            ("TiB", 2.0**40))},
    }
)  # fmt: skip
_ALIASES = types.MappingProxyType(
    {
        **{u.lower(): u for u in _UNITS},
        **dict.fromkeys(("nanosecond", "nanoseconds"), "ns"),
        **dict.fromkeys(("µs", "μs", "microsecond", "microseconds"), "us"),
        **dict.fromkeys(("msec", "millisecond", "milliseconds"), "ms"),
        **dict.fromkeys(("sec", "secs", "second", "seconds"), "s"),
        **dict.fromkeys(("mins", "minute", "minutes"), "min"),
        **dict.fromkeys(("hr", "hrs", "hour", "hours"), "h"),
        **dict.fromkeys(("day", "days"), "d"),
        **dict.fromkeys(("w", "weeks"), "week"),
        **dict.fromkeys(("bits",), "bit"),
        **dict.fromkeys(("byte", "bytes"), "B"),
    }
)
#: "Mb" is megabits to a network engineer and megabytes to many others.
_AMBIGUOUS = re.compile(r"^[kKmMgGtT]?b$")


def _unit(name: str) -> str:
    text = name.strip()
    if _AMBIGUOUS.match(text):
        prefix = text[:-1].lower()
        bits = {"": "bit", "k": "kbit", "m": "Mbit", "g": "Gbit", "t": "Tbit"}[prefix]
        raise ToolError(f"ambiguous unit {name!r}: write {prefix.upper()}B for bytes or {bits} for bits")
    canonical = _ALIASES.get(text.lower())
    if canonical is None:
        raise ToolError(f"unknown unit {name!r}; known: {', '.join(_UNITS)}")
    return canonical


def unit_convert(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert a duration or an amount of data between units: ns, us, ms, s, min, h, d, week; bit,
    kbit, Mbit, Gbit, Tbit, B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of
    1024).

    Decimal and binary prefixes are kept distinct (1 GB = 1e9 B, 1 GiB =
    1073741824 B) because mixing them is a 7% error that models often make.

    Args:
        value: The amount to convert.
        from_unit: Its unit, e.g. ms or MiB.
        to_unit: The unit wanted, of the same kind (time or data).
    """
    source, target = _unit(from_unit), _unit(to_unit)
    (source_dim, source_size), (target_dim, target_size) = _UNITS[source], _UNITS[target]
    if source_dim != target_dim:
        raise ToolError(f"cannot convert {source_dim} ({source}) to {target_dim} ({target})")
    result = value * source_size / target_size
    if not math.isfinite(result):
        raise ToolError("result too large")
    return {"value": result, "unit": target, "from_value": value, "from_unit": source}


def current_time(timezone: Annotated[str, "IANA time zone name, e.g. Europe/Paris"] = "UTC") -> dict[str, Any]:
    """The current date and time in a time zone: ISO 8601 timestamp, date, time, weekday, UTC offset
    and Unix time.

    Models do not know the date; this is the tool that tells them.
    """
    key = timezone.strip()
    try:
        zone = zoneinfo.ZoneInfo("UTC" if key.upper() in ("UTC", "GMT", "Z") else key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "America" is a directory
        raise ToolError(f"unknown time zone {timezone!r}; use an IANA name such as UTC or America/New_York") from None
    now = dt.datetime.now(zone)
    offset = now.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return {
        "timezone": zone.key,
        "iso": now.isoformat(timespec="seconds"),
        "date": now.date().isoformat(),
        "time": now.time().isoformat(timespec="seconds"),
        "weekday": now.strftime("%A"),
        "utc_offset": f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}",
        "unix": int(now.timestamp()),
    }


def builtin_tools() -> list[Tool]:
    """Fresh Tool objects for the built-in tools (a factory, so that no
    registry lives at module level and a server may pick what it offers)."""
    return [
        tool(calculator, timeout_s=5.0, blocking=False),
        tool(statistics, blocking=False),
        tool(correlation, blocking=False),
        tool(llm_cost_estimate, blocking=False),
        tool(throughput_plan, blocking=False),
        tool(unit_convert, blocking=False),
        tool(current_time, blocking=False),
    ]
