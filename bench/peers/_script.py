"""The scripted run shared by the bench's reference servers (the FastAPI peer
and the raw floor), so both emit exactly the same event sequence and only
their frameworks differ.

It mirrors netra's scripted model (netra/models/scripted.py) driven by its
agent loop: every ``[[tool:NAME {json args}]]`` marker in the user's text is
one model step with one tool call, in order; then a last step streams the
answer in 4 ``text_delta`` chunks, or N with a ``[[stream:N]]`` marker (the
answer padded, as netra pads it, when it is shorter than N). Each tool call
and each chunk waits ``NETRA_SCRIPTED_DELAY_MS`` first, as netra's model does.
The script is a plain generator of steps, free of any event loop: each
server drives it with its own ``sleep`` (asyncio or trio), which is the part
being compared.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

MARKER = re.compile(r"\[\[tool:([A-Za-z_][\w.-]*)\s*(\{.*?\})?\s*\]\]", re.S)
ANY_MARKER = re.compile(r"\[\[(?:tool|stream|model):.*?\]\]", re.S)
STREAM = re.compile(r"\[\[stream:(\d{1,5})\]\]")
AGENT = "assistant"
CHUNKS = 4  # netra's scripted model streams its answer in 4 chunks by default

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic safely: only numbers, + - * / // % ** and
    parentheses; no names, calls or attributes, small exponents only."""
    if len(expression) > 200:
        raise ValueError("expression too long")

    def walk(node: ast.AST) -> int | float:
        match node:
            case ast.Expression(body=body):
                return walk(body)
            case ast.Constant(value=value) if type(value) in (int, float):
                return value
            case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINOPS:
                lhs, rhs = walk(left), walk(right)
                if isinstance(op, ast.Pow) and abs(rhs) > 64:
                    raise ValueError("exponent too large")
                return _BINOPS[type(op)](lhs, rhs)
            case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
                return _UNARY[type(op)](walk(operand))
        raise ValueError("unsupported expression")

    value = walk(ast.parse(expression, mode="eval"))
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def call_tool(name: str, args: dict[str, Any]) -> tuple[Any, str | None]:
    """(result, error) of one tool call; unknown tools fail like netra's."""
    try:
        if name == "calculator":
            return calculate(str(args.get("expression", ""))), None
        if name == "echo":
            return args.get("text", ""), None
        return None, f"unknown tool {name!r}"
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def new_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


def _split(answer: str, n: int) -> list[str]:
    """``n`` non-empty chunks of nearly equal length, as netra's model does."""
    n = max(1, min(n, len(answer)))
    size, extra = divmod(len(answer), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(answer[start:end])
        start = end
    return chunks


def script(text: str, *, run_id: str, thread_id: str, ref: str | None,
           delay_s: float) -> Iterator[dict[str, Any] | float]:
    """Steps of one run: an event dict (``type`` plus its fields, without
    ``seq``/``ts``, which the connection assigns), or a float = seconds to
    sleep before the next step. One model step per tool call, then one for
    the answer, like netra's agent loop over its scripted model."""
    started = time.perf_counter()
    scope = {"run_id": run_id, "thread_id": thread_id}
    message_id = new_id()
    started_ev: dict[str, Any] = {"type": "agent_started", **scope, "agent": AGENT, "message_id": message_id}
    if ref is not None:
        started_ev["ref"] = ref
    yield started_ev
    markers = MARKER.findall(text)
    outcomes = []
    for i, (name, raw_args) in enumerate(markers):
        plan = f"I need the {name} tool (call {i + 1} of {len(markers)})."
        yield {"type": "agent_thinking", **scope, "agent": AGENT, "text": plan, "step": i + 1}
        if delay_s > 0:
            yield delay_s
        try:
            args = json.loads(raw_args or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            args = {"_raw": (raw_args or "")[:1000]}
        call_id = f"call_{i + 1}"
        yield {"type": "tool_executing", **scope, "tool_call_id": call_id, "tool": name, "args": args}
        t0 = time.perf_counter()
        result, error = call_tool(name, args)
        done: dict[str, Any] = {
            "type": "tool_completed", **scope, "tool_call_id": call_id, "tool": name,
            "duration_ms": int((time.perf_counter() - t0) * 1000),
        }
        if error is None:
            done["result"] = result
            outcomes.append(f"{name} returned {json.dumps(result)[:200]}")
        else:
            done["error"] = error
            outcomes.append(f"{name} failed: {error[:200]}")
        yield done
    plan = "I have the tool results; writing the answer." if markers else "Writing the answer."
    yield {"type": "agent_thinking", **scope, "agent": AGENT, "text": plan, "step": len(markers) + 1}
    question = " ".join(ANY_MARKER.sub(" ", text).split())
    if outcomes:
        answer = f"Here is what I found for \u201c{question[:200]}\u201d: " + "; ".join(outcomes) + "."
    else:
        answer = f"You said: \u201c{question[:500]}\u201d. This is the scripted model's answer."
    stream = STREAM.search(text) if "[[" in text else None
    n = int(stream.group(1)) if stream else CHUNKS
    if len(answer) < n:  # enough text for the chunks asked for, as netra's model pads it
        answer += " streaming" * ((n - len(answer)) // 10 + 1)
    pieces = _split(answer, n)
    for piece in pieces:
        if delay_s > 0:
            yield delay_s
        yield {"type": "text_delta", **scope, "message_id": message_id, "delta": piece}
    yield {
        "type": "agent_completed", **scope, "message_id": message_id, "text": "".join(pieces),
        "usage": {"prompt_tokens": len(text.split()), "completion_tokens": len(pieces)},
        "duration_ms": int((time.perf_counter() - started) * 1000), "agent": AGENT,
    }
