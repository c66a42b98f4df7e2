"""netra's tool approvals as AG-UI interrupts, and AG-UI resume entries as
netra's decisions.

A netra run that needs its user's approval for a tool call announces
``approval_required`` and waits (see :mod:`netra.approvals`). AG-UI has no
channel from the client into a running run: a run that needs an answer
ends with the interrupt outcome, and the client answers in the ``resume``
entries of the next run on the thread. So each ``approval_required`` an
``/agui`` stream carries becomes one :class:`ag_ui.core.Interrupt`, and each
resume entry that answers one becomes the ``tool_decision`` a ``/ws``
client would send: the same checks, the same board, the same record.

Pure: no I/O, so the mapping can be checked without a server.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any, Final

import attrs
from ag_ui.core import Interrupt

from .. import _json
from ..errors import BadRequest
from ..protocol import ApprovalRequired, ToolDecision, parse_client_message
from ..tools import Tool, ToolArgumentsError

#: The interrupt's ``reason`` for a tool call waiting for approval.
TOOL_APPROVAL: Final = "tool_approval"
#: The metadata key of what only netra knows, on every event (AG-UI reserves ``ag-ui``).
META: Final = "netra"


@attrs.frozen(kw_only=True)
class ResumeAnswer:
    """One resume entry, read: the answer to one interrupt."""

    interrupt_id: str
    #: ``resolved``: answered by ``approve``; ``cancelled``: abandoned, which
    #: refuses the call as ``approve: false`` does.
    status: str
    approve: bool = False
    #: Arguments to run the call with instead of the model's (approve only).
    args: dict[str, Any] | None = None
    reason: str | None = None


def interrupt_id(netra_run_id: str, tool_call_id: str) -> str:
    """The interrupt of one call: unique within the run, as AG-UI requires,
    and across the thread, since netra's run ids are."""
    return f"{netra_run_id}.{tool_call_id}.approval"


def wire_call_id(netra_run_id: str, tool_call_id: str) -> str:
    """A tool call's id on the wire (a model's ids are unique within a run only)."""
    return f"{netra_run_id}.{tool_call_id}"


def interrupt_for(ask: ApprovalRequired, tool: Tool | None) -> Interrupt:
    """The interrupt of one call waiting for approval. ``tool`` (None when
    unknown) gives the schema of the arguments an answer may edit."""
    expires = datetime.datetime.fromtimestamp(ask.expires_at_ms / 1000, tz=datetime.UTC)
    return Interrupt(
        id=interrupt_id(ask.run_id, ask.tool_call_id),
        reason=TOOL_APPROVAL,
        message=f"The agent wants to call {ask.tool}: approve or deny the call.",
        tool_call_id=wire_call_id(ask.run_id, ask.tool_call_id),
        response_schema=response_schema(tool),
        # ISO 8601, as AG-UI's client reads it to tell an expired interrupt
        expires_at=expires.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        metadata={META: {
            "run_id": ask.run_id, "tool_call_id": ask.tool_call_id, "tool": ask.tool, "args": ask.args,
            "expires_at_ms": ask.expires_at_ms,
        }},
    )  # fmt: skip


def response_schema(tool: Tool | None) -> dict[str, Any]:
    """The answer an approval takes, as JSON Schema, so a front end can build its form."""
    args: dict[str, Any] = copy.deepcopy(tool.parameters) if tool is not None else {"type": "object"}
    args["description"] = (
        "Run the call with these arguments instead of the model's (with approve true only); "
        "they are checked as the model's are."
    )
    return {
        "type": "object",
        "properties": {
            "approve": {"type": "boolean", "description": "true runs the call; false refuses it."},
            "args": args,
            "reason": {"type": "string", "description": "Why: kept with the decision, and told to the model."},
        },
        "required": ["approve"],
        "additionalProperties": False,
    }


def read_payload(interrupt: str, status: str, payload: Any) -> ResumeAnswer:
    """A resume entry's answer; BadRequest when it is not one the schema describes."""
    if status == "cancelled":
        return ResumeAnswer(interrupt_id=interrupt, status=status)
    where = f"the resume payload of {interrupt[:140]!r}"
    if not isinstance(payload, dict) or not isinstance(payload.get("approve"), bool):
        raise BadRequest(f'{where} must be an object with "approve": true or false')
    unknown = sorted(set(payload) - {"approve", "args", "reason"})
    if unknown:
        names = ", ".join(k[:40] for k in unknown[:5])
        raise BadRequest(f"{where} has unknown fields: {names} (known: approve, args, reason)")
    args, reason = payload.get("args"), payload.get("reason")
    if args is not None and not isinstance(args, dict):
        raise BadRequest(f'{where}: "args" must be an object of the tool\'s arguments')
    if args is not None and not payload["approve"]:
        raise BadRequest(f'{where}: "args" goes with "approve": true only; a refused call does not run')
    if reason is not None and not isinstance(reason, str):
        raise BadRequest(f'{where}: "reason" must be a string')
    return ResumeAnswer(interrupt_id=interrupt, status=status, approve=payload["approve"], args=args, reason=reason)


def decision_for(answer: ResumeAnswer, ask: ApprovalRequired, tool: Tool | None, *, max_bytes: int) -> ToolDecision:
    """The ``tool_decision`` an answer amounts to, checked as one from
    ``/ws`` is: the frame's own rules, then edited arguments against the
    tool. BadRequest (or TooLarge) otherwise; nothing is decided here."""
    approve = answer.status == "resolved" and answer.approve
    frame = {
        "type": "tool_decision", "run_id": ask.run_id, "tool_call_id": ask.tool_call_id,
        "decision": "approve" if approve else "deny", "args": answer.args if approve else None,
        "reason": answer.reason,
    }  # fmt: skip
    decision = parse_client_message(_json.dumps_str(frame), max_bytes=max_bytes)
    assert isinstance(decision, ToolDecision)
    if decision.args is not None:
        if tool is None:  # not among the run's agent's tools now: the edit cannot be checked here
            raise BadRequest(f"the arguments of {ask.tool} cannot be edited now; approve or deny the call as it is")
        try:
            tool.parse_arguments(_json.dumps_str(decision.args))
        except ToolArgumentsError as exc:
            raise BadRequest(
                f"the edited arguments do not fit {ask.tool}: {exc.message}. The call still waits for a decision."
            ) from None
    return decision

