"""An AG-UI ``RunAgentInput`` body, read into the one netra run it asks for.

An AG-UI client sends its whole conversation with every run; netra keeps
the thread's history itself (the same thread a ``/ws`` client sees), so it
takes from the input what names the run (``threadId``, ``runId``), the
latest user message (the message this run answers, its ``id`` becoming
netra's client message id, so a retried request is not answered twice),
and ``forwardedProps.agent`` / ``forwardedProps.multitask`` (as a ``/ws``
``user_message`` carries them). ``tools``, ``context`` and ``state`` are
validated and otherwise left alone: netra's agents call netra's tools.

An input with ``resume`` entries continues a run that ended at an interrupt
(a tool call waiting for approval, see :mod:`netra.agui._interrupts`): its
entries are read into answers, and its messages are not what it runs on, so
a user message is then optional.

Everything a client can send is answered with a :class:`netra.errors.NetraError`
(400 or 413) or a :class:`RunRequest`; nothing else escapes, whatever the
bytes. The pydantic models of ``ag_ui.core`` are the schema, so what netra
accepts is what the protocol says a run input is.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs
import orjson
import pydantic
from ag_ui.core import RunAgentInput, TextPart, UserMessage

from ..errors import BadRequest, TooLarge
from ..protocol import Multitask
from ._interrupts import ResumeAnswer, read_payload

#: Thread ids an AG-UI client may choose: they become netra thread ids, so
#: they must be safe in a URL path (``/api/threads/<id>``) and in a log line.
_THREAD_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_ID_CHARS: Final = 128
_MULTITASK: Final = ("reject", "enqueue", "interrupt")
#: Validation errors named in a 400: enough to fix the request, bounded.
_ERRORS_SHOWN: Final = 3
#: Resume entries one input may carry: a run waits on a few calls at most.
_MAX_RESUME: Final = 64
_MAX_INTERRUPT_ID_CHARS: Final = 512


@attrs.frozen(kw_only=True)
class RunRequest:
    """What netra needs from a ``RunAgentInput`` to start its run."""

    thread_id: str
    #: The client's run id: echoed on the run's AG-UI events (netra's own
    #: run id travels in their metadata).
    run_id: str
    #: The latest user message's text: what a new run answers. None only
    #: with ``resume`` (a resumed run answers the message it began with).
    text: str | None
    #: The user message's id: netra's client message id for the run.
    message_id: str | None
    agent: str | None = None
    multitask: Multitask | None = None
    #: The answers to the interrupts of a paused run, in the input's order.
    resume: tuple[ResumeAnswer, ...] = ()


def parse_run_input(body: bytes | str, *, max_text_chars: int) -> RunRequest:
    """Read a request body; BadRequest or TooLarge when it is not a run netra can start."""
    try:
        obj = orjson.loads(body)  # strict JSON, and a bounded nesting depth
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("the body must be a JSON object (an AG-UI RunAgentInput)")
    try:
        run_input = RunAgentInput.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise BadRequest(f"not a valid AG-UI RunAgentInput: {_describe(exc)}") from None
    except RecursionError:
        raise BadRequest("not a valid AG-UI RunAgentInput: nested too deeply") from None
    return _run_request(run_input, max_text_chars=max_text_chars)


def _run_request(run_input: RunAgentInput, *, max_text_chars: int) -> RunRequest:
    thread_id = run_input.thread_id
    if not _THREAD_ID.fullmatch(thread_id):
        raise BadRequest(
            "'threadId' must be 1 to 128 letters, digits or . _ : - (it names a netra thread), "
            "starting with a letter or digit"
        )
    run_id = run_input.run_id
    if not 0 < len(run_id) <= _MAX_ID_CHARS:
        raise BadRequest(f"'runId' must be a non-empty string of at most {_MAX_ID_CHARS} characters")
    resume = _resume(run_input)
    message = next((m for m in reversed(run_input.messages) if isinstance(m, UserMessage)), None)
    if message is None:
        if resume:
            agent, multitask = _forwarded(run_input.forwarded_props)
            return RunRequest(thread_id=thread_id, run_id=run_id, text=None, message_id=None,
                              agent=agent, multitask=multitask, resume=resume)  # fmt: skip
        raise BadRequest("'messages' has no user message: a run answers the latest one")
    if not 0 < len(message.id) <= _MAX_ID_CHARS:
        raise BadRequest(f"a message 'id' must be a non-empty string of at most {_MAX_ID_CHARS} characters")
    text = _text_of(message)
    if not text.strip():
        raise BadRequest("the latest user message has no text")
    if len(text) > max_text_chars:
        raise TooLarge(f"the latest user message is longer than {max_text_chars} characters")
    agent, multitask = _forwarded(run_input.forwarded_props)
    return RunRequest(
        thread_id=thread_id, run_id=run_id, text=text, message_id=message.id,
        agent=agent, multitask=multitask, resume=resume,
    )


def _resume(run_input: RunAgentInput) -> tuple[ResumeAnswer, ...]:
    """The resume entries, each read into its answer (BadRequest otherwise)."""
    entries = run_input.resume or []
    if len(entries) > _MAX_RESUME:
        raise BadRequest(f"'resume' has more than {_MAX_RESUME} entries")
    answers, seen = [], set()
    for entry in entries:
        iid = entry.interrupt_id
        if not 0 < len(iid) <= _MAX_INTERRUPT_ID_CHARS:
            raise BadRequest(
                f"an 'interruptId' must be a non-empty string of at most {_MAX_INTERRUPT_ID_CHARS} characters"
            )
        if iid in seen:
            raise BadRequest(f"'resume' answers interrupt {iid[:140]!r} twice")
        seen.add(iid)
        answers.append(read_payload(iid, entry.status, entry.payload))
    return tuple(answers)


def _text_of(message: UserMessage) -> str:
    """A user message's text: its content, or its text parts joined. netra's
    agents read text, so a message with any other part is refused rather
    than answered as if the part were not there."""
    content = message.content
    if isinstance(content, str):
        return content
    others = sorted({part.type for part in content if not isinstance(part, TextPart)})
    if others:
        raise BadRequest(f"netra's agents read text; the latest user message has {', '.join(others)} parts")
    return "\n".join(part.text for part in content if isinstance(part, TextPart))


def _forwarded(props: Any) -> tuple[str | None, Multitask | None]:
    """``forwardedProps.agent`` and ``forwardedProps.multitask``, checked as
    a ``/ws`` ``user_message`` checks its ``agent`` and ``multitask``."""
    if not isinstance(props, dict):
        return None, None  # absent, or an application's own value: nothing for netra
    agent = props.get("agent")
    if agent is not None and (not isinstance(agent, str) or not 0 < len(agent) <= _MAX_ID_CHARS):
        raise BadRequest(f"'forwardedProps.agent' must be an agent's name (at most {_MAX_ID_CHARS} characters)")
    multitask = props.get("multitask")
    if multitask is not None and multitask not in _MULTITASK:
        raise BadRequest("'forwardedProps.multitask' must be reject, enqueue or interrupt")
    return agent, multitask


def _describe(exc: pydantic.ValidationError) -> str:
    """The first few problems, as ``path: message``, for a client to fix."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "(body)"
        parts.append(f"{where[:100]}: {str(error.get('msg', 'invalid'))[:200]}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
