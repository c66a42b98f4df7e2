"""``netra chat``: talk to an agent from a terminal.

One trio task owns the conversation; stdin is read in a worker thread (a
terminal read cannot be cancelled, so that thread is simply abandoned on
exit) and lines reach the conversation through a channel, so events keep
streaming while the user types. SIGINT goes through trio's signal receiver
rather than KeyboardInterrupt, so a Ctrl-C can mean "stop this run" without
tearing the connection down: the first one during a run sends ``cancel``,
a second one (or one at an idle prompt, or Ctrl-D) quits with status 0.
A tool call that needs the user's approval is asked about (y/n) while the
run waits, in a task of its own, so the run's events keep coming and a
call decided elsewhere (another connection, the timeout) stops the asking.

stdin is read with ``os.read`` on the file descriptor, not ``sys.stdin``:
an abandoned thread blocked inside ``sys.stdin.readline`` holds the buffer's
lock, which makes the interpreter abort at exit.

On a terminal that takes colour, answers are rendered as markdown while they
stream (``_markdown.py``); with ``--plain``, ``NO_COLOR``, ``TERM=dumb``, or
when the output is not a terminal, they are printed as the model wrote them.
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import signal
import sys
import types
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TextIO

import attrs
import trio

from ..protocol import TERMINAL, Received
from ._connection import Connection, connect
from ._errors import (
    ClientError,
    ConnectionClosed,
    ConnectionRefused,
    DecisionRefused,
    RunRefused,
    ServerUnreachable,
)

if TYPE_CHECKING:
    from ._markdown import LiveMarkdown

NO_TOKEN = """\
netra chat: no token. Pass --token TOKEN or set NETRA_TOKEN.
  A development server (netra serve without NETRA_JWT_SECRET) prints a token when it starts,
  and `netra token --user YOUR_ID`, run in the same folder, mints more.
  Otherwise mint one with the server's secret:
    NETRA_JWT_SECRET=... netra token --user YOUR_ID"""

CLOSE_TEXT = types.MappingProxyType({
    1000: "the server closed the connection",
    1001: "the server is shutting down or restarting; run netra chat again in a moment",
    1006: "the connection was lost",
    1007: "the server refused a message that was not valid UTF-8",
    1009: "a message was larger than the server accepts",
    1011: "the server hit an internal error",
    4400: "the server closed the connection after repeated malformed messages",
    4401: "the token was refused or has expired; get a new one (netra token --user ID)",
    4408: "authentication took too long",
    4429: "too many connections or messages for this user; wait and try again",
    4430: "this client fell behind reading events",
})


def close_text(code: int | None, reason: str | None) -> str:
    text = CLOSE_TEXT.get(code or 1006, "the connection closed")
    return f"{text} ({code}{': ' + reason if reason else ''})"


def run_chat(url: str, token: str | None, agent: str | None = None, *, plain: bool = False) -> int:
    """Exit status: 0 when the user quits, 1 when the connection fails or
    ends, 2 for a usage mistake (no token, not a ws:// URL). ``plain``:
    print answers as written, even on a terminal that could render them."""
    if not token:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    if not url.startswith(("ws://", "wss://")):
        print(f"netra chat: --url must be a ws:// or wss:// URL, not {url!r}", file=sys.stderr)
        return 2
    try:
        return trio.run(_chat, url, token, agent, Output.for_stream(sys.stdout, plain=plain))
    except KeyboardInterrupt:  # before the signal receiver was in place
        return 0


async def _chat(url: str, token: str, agent: str | None, out: Output) -> int:
    with trio.open_signal_receiver(signal.SIGINT) as sigint:
        try:
            async with connect(url, token) as conn:
                return await Chat(conn=conn, out=out, agent=agent).main(sigint)
        except Exception as exc:  # a nursery's group, should one still reach here
            problem = _leaf(exc)
            match problem:
                case ConnectionRefused():
                    text = f"the server refused the connection: {problem}"
                case ConnectionClosed():
                    text = close_text(problem.code, problem.reason)
                case ServerUnreachable():
                    text = f"could not connect to {url}: {problem.detail}"
                case ClientError():
                    text = f"protocol error: {problem}"
                case _:
                    raise
            print(f"netra chat: {text}", file=sys.stderr)
            return 1


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


#: The commands of the prompt; anything else that starts with "/" is answered
#: here and never sent, so a mistyped command cannot reach the model.
HELP = """\
commands:
  /help          this list
  /new           start a new conversation
  /quit, /exit   quit (so do Ctrl-D, and Ctrl-C at the prompt)
  //text         send a message that begins with "/" (as /text)
Ctrl-C during a run stops that run. A tool call that needs your approval
asks "approve? [y/n]": y runs it, n refuses it (n REASON tells the agent why)."""


_TRANSIENT = frozenset({"run_queued", "agent_started", "agent_thinking", "tool_executing"})


@attrs.define(eq=False)
class RunState:
    run_id: str | None = None
    agent: str = "assistant"
    cancel_requested: bool = False
    answering: bool = False
    tools: dict[str, str] = attrs.field(factory=dict)
    #: Calls being asked about (y/n), by tool call id.
    asking: dict[str, Asking] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Asking:
    """One approval question: what stops it, and whether it is on screen
    waiting for its answer."""

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    waiting: bool = False


@attrs.define(eq=False)
class Chat:
    conn: Connection
    out: Output
    agent: str | None = None
    thread_id: str | None = None
    run: RunState | None = None
    exit_code: int = 0
    closed_reported: bool = False
    painting: bool = False
    _nursery: trio.Nursery | None = None
    #: The typed lines, for the approval questions asked during a run (the
    #: conversation waits for the run meanwhile), one question at a time.
    _lines: trio.MemoryReceiveChannel[str] | None = None
    _asking: trio.Lock = attrs.field(factory=trio.Lock)

    async def main(self, sigint: AsyncIterator[int]) -> int:
        self.out.note(
            f"connected as {self.conn.user_id}. Enter sends; Ctrl-C stops a run; "
            "Ctrl-C at the prompt or Ctrl-D quits; /help lists the commands."
        )
        send_lines, lines = trio.open_memory_channel[str](0)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(_read_lines, send_lines)
            nursery.start_soon(self._watch_sigint, sigint)
            nursery.start_soon(self._watch_close)
            nursery.start_soon(self._converse, lines)
        return self.exit_code

    def quit(self, code: int) -> None:
        self.exit_code = code
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _converse(self, lines: trio.MemoryReceiveChannel[str]) -> None:
        self._lines = lines
        self.out.prompt()
        async for line in lines:
            text = line.strip()
            if text.startswith("//"):
                await self._send(text[1:])
            elif text.startswith("/"):
                if self._command(text):
                    return self.quit(0)
            elif text:
                await self._send(line)
            self.out.prompt()
        self.out.line("")  # EOF (Ctrl-D): end the prompt's line
        self.quit(0)

    def _command(self, text: str) -> bool:
        """Carry out a slash command locally; True when it means quit."""
        name, _, rest = text.partition(" ")
        if name in ("/quit", "/exit", "/new", "/help") and rest.strip():
            self.out.error(f"{name} takes no arguments; nothing was sent")
            return False
        match name:
            case "/quit" | "/exit":
                return True
            case "/new":
                self.thread_id = None
                self.out.note("(a new conversation)")
            case "/help":
                self.out.note(HELP)
            case _:
                self.out.error(f"unknown command {name}; nothing was sent (/help lists the commands)")
        return False

    async def _send(self, text: str) -> None:
        state = self.run = RunState()
        try:
            async for received in self.conn.run(text, thread_id=self.thread_id, agent=self.agent):
                if state.run_id is None and received.raw.get("run_id"):
                    state.run_id = received.raw["run_id"]
                    self.thread_id = received.raw.get("thread_id") or self.thread_id
                    if state.cancel_requested:
                        await self.conn.cancel(run_id=state.run_id)
                self._follow_approvals(received, state)
                self._show(received, state)
        except RunRefused as exc:
            self.out.error(f"refused ({exc.code}): {exc.message}")
        except ConnectionClosed as exc:  # also: closed before the message could be sent
            self._report_close(exc)
        finally:
            self.run = None
            self._stop_asking(state, list(state.asking))

    def _show(self, received: Received, state: RunState) -> None:
        raw, out, sym = received.raw, self.out, self.out.symbols
        if state.cancel_requested and received.type in _TRANSIENT:
            return  # keep "cancelling..." on screen until the run answers
        match received.type:
            case "run_queued":
                out.status(f"{sym.dots} queued (position {raw.get('position')})")
            case "agent_started":
                state.agent = raw.get("agent") or state.agent
                out.status(f"{sym.dots} {state.agent} started")
            case "agent_thinking":
                text = raw.get("text") or ""
                out.status(f"{sym.dots} thinking (step {raw.get('step')})" + (f": {text}" if text else ""))
            case "tool_executing":
                call = f"{sym.gear} {raw.get('tool')} {_short(raw.get('args'))}"
                state.tools[raw.get("tool_call_id", "")] = call
                out.status(f"{call} {sym.dots}")
            case "tool_completed":
                call = state.tools.get(raw.get("tool_call_id", ""), f"{sym.gear} {raw.get('tool')}")
                ms = raw.get("duration_ms")
                if "error" in raw:
                    out.line(f"{call} {sym.cross} {_short(raw['error'])} ({ms} ms)", style="red")
                else:
                    out.line(f"{call} {sym.arrow} {_short(raw.get('result'))} ({ms} ms)")
            case "text_delta":
                if not state.answering:
                    state.answering = True
                    out.begin_answer(f"{state.agent}> ")
                out.chunk(raw.get("delta", ""))
                self._paint_soon()
            case "agent_completed":
                if not state.answering:
                    out.begin_answer(f"{state.agent}> ")
                    out.chunk(raw.get("text", ""))
                out.end_answer()
            case "agent_error":
                hint = " (you can try again)" if raw.get("retryable") else ""
                out.error(f"error ({raw.get('code')}): {raw.get('message')}{hint}")
            case "agent_cancelled":
                out.line(f"cancelled ({raw.get('reason')})", style="yellow")

    def _paint_soon(self) -> None:
        """Redraw a streaming markdown answer once its redraw is due, even
        if no more text comes by then."""
        if not self.painting and self.out.paint_delay() is not None and self._nursery is not None:
            self.painting = True
            self._nursery.start_soon(self._paint_later)

    async def _paint_later(self) -> None:
        try:
            while (delay := self.out.paint_delay()) is not None:
                await trio.sleep(delay)
                self.out.paint()
        finally:
            self.painting = False

    # -- approvals ----------------------------------------------------------------

    def _follow_approvals(self, received: Received, state: RunState) -> None:
        """Ask about each call that waits for approval; stop asking once the
        call went on without this answer (its tool_executing: decided
        elsewhere, or expired) or the run ended."""
        raw = received.raw
        call_id = raw.get("tool_call_id", "")
        if received.type == "approval_required" and not state.cancel_requested:
            assert self._nursery is not None
            asking = state.asking[call_id] = Asking()
            self._nursery.start_soon(self._ask_approval, raw, asking)
        elif received.type == "tool_executing":
            self._stop_asking(state, [call_id])
        elif received.type in TERMINAL:
            self._stop_asking(state, list(state.asking))

    def _stop_asking(self, state: RunState, call_ids: list[str]) -> None:
        for call_id in call_ids:
            asking = state.asking.pop(call_id, None)
            if asking is None:
                continue
            asking.scope.cancel()
            if asking.waiting:  # said here, in order with the run's own lines
                asking.waiting = False
                self.out.note("(no longer waiting for this answer)")

    async def _ask_approval(self, raw: dict[str, Any], asking: Asking) -> None:
        out, sym = self.out, self.out.symbols
        with asking.scope:
            async with self._asking:
                out.line(f"{sym.gear} {raw.get('tool')} {_short(raw.get('args'))} needs your approval", style="yellow")
                asking.waiting = True
                approve, reason = await self._yes_or_no()
                asking.waiting = False
            try:
                await self.conn.decide(raw["run_id"], raw["tool_call_id"], approve=approve, reason=reason)
            except DecisionRefused as exc:
                out.error(f"the decision was not taken ({exc.code}): {exc.message}")
            except ConnectionClosed:
                pass  # the close watcher reports it

    async def _yes_or_no(self) -> tuple[bool, str | None]:
        """y or n (n may be followed by a reason for the model); the end of
        input is a no."""
        assert self._lines is not None
        while True:
            self.out.ask("approve? [y/n, or n REASON] ")
            try:
                line = await self._lines.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return False, "no answer (the terminal's input ended)"  # the next line ends the question's
            self.out.question_open = False  # a terminal echoed the line and its Enter
            if not os.isatty(0):  # nothing echoed the answer: show it
                self.out.line(line.strip())
            word, _, rest = line.strip().partition(" ")
            match word.lower().rstrip(",:"):
                case "y" | "yes":
                    return True, None
                case "n" | "no":
                    return False, rest.strip() or None
            self.out.error("answer y or n")

    async def _watch_sigint(self, sigint: AsyncIterator[int]) -> None:
        async for _ in sigint:
            state = self.run
            if state is None or state.cancel_requested:
                self.out.line("")
                return self.quit(0)
            state.cancel_requested = True
            self.out.status(f"cancelling{self.out.symbols.dots} (Ctrl-C again to quit)")
            if state.run_id is not None:
                try:
                    await self.conn.cancel(run_id=state.run_id)
                except ConnectionClosed:
                    pass  # the close watcher reports it

    async def _watch_close(self) -> None:
        self._report_close(await self.conn.wait_closed())

    def _report_close(self, closed: ConnectionClosed) -> None:
        if not self.closed_reported:
            self.closed_reported = True
            self.out.error(close_text(closed.code, closed.reason))
        self.quit(1)


async def _read_lines(send: trio.MemorySendChannel[str]) -> None:
    """Lines of stdin, decoded incrementally; the channel closes at EOF."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async with send:
        while True:
            data = await trio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True)
            pending += decoder.decode(data, final=not data)
            *complete, pending = pending.split("\n")
            for line in complete:
                await send.send(line)
            if not data:
                if pending:
                    await send.send(pending)
                return


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@attrs.frozen
class Symbols:
    gear: str
    arrow: str
    cross: str
    dots: str


_CONTROLS = {c: None for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\n\t"}


def strip_controls(text: str) -> str:
    """The text without control characters, except newline and tab: what a
    model writes must not drive the terminal (move the cursor, set the
    window title, write the clipboard)."""
    return text.translate(_CONTROLS)


FANCY = Symbols(gear="⚙", arrow="→", cross="✗", dots="…")
PLAIN = Symbols(gear="*", arrow="->", cross="x", dots="...")
STYLES = types.MappingProxyType({"dim": "\033[2m", "red": "\033[31m", "yellow": "\033[33m"})


@attrs.define(eq=False)
class Output:
    """What the user sees. On a terminal the progress line is transient:
    each update overwrites the last (cut to the width, since a wrapped line
    cannot be overwritten); piped, every update is a line of its own.

    With ``markdown``, an answer is drawn by a :class:`LiveMarkdown` below
    its ``agent>`` line; otherwise its text follows that prefix as it came."""

    stream: TextIO
    tty: bool
    color: bool
    symbols: Symbols
    markdown: bool = False
    transient: bool = False
    answer_open: bool = False
    #: An approval question waits on its line for the typed answer.
    question_open: bool = False
    live: LiveMarkdown | None = None

    @classmethod
    def for_stream(cls, stream: TextIO, *, plain: bool = False) -> Output:
        tty = stream.isatty()
        try:
            "⚙→✗…•".encode(stream.encoding or "ascii")
            symbols = FANCY
        except (UnicodeEncodeError, LookupError):
            symbols = PLAIN
        color = tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        markdown = color and not plain and symbols is FANCY  # rich draws boxes and bullets
        return cls(stream=stream, tty=tty, color=color, symbols=symbols, markdown=markdown)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _style(self, text: str, style: str | None) -> str:
        return f"{STYLES[style]}{text}\033[0m" if style and self.color else text

    def _settle(self) -> None:
        """Clear a transient line, and end an answer a progress line interrupts."""
        if self.transient:
            self._write("\r\033[K")
            self.transient = False
        if self.question_open:  # nobody answered it on its line: what follows starts a line of its own
            self._write("\n")
            self.question_open = False
        self.end_answer()

    def status(self, text: str) -> None:
        self._settle()
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            if len(text) > width:
                text = text[: width - 1] + "…"
            self._write(self._style(text, "dim"))
            self.transient = True
        else:
            self._write(self._style(text, "dim") + "\n")

    def line(self, text: str, *, style: str | None = None) -> None:
        self._settle()
        self._write(self._style(text, style) + "\n")

    def note(self, text: str) -> None:
        self.line(text, style="dim")

    def error(self, text: str) -> None:
        self.line(text, style="red")

    def begin_answer(self, prefix: str) -> None:
        self._settle()
        if self.markdown:
            self._write(self._style(prefix.rstrip(), "dim") + "\n")
        else:
            self._write(self._style(prefix, "dim"))
        self.answer_open = True

    def chunk(self, text: str) -> None:
        if not self.markdown:
            self._write(strip_controls(text) if self.tty else text)  # a pipe gets the answer as written
            return
        if self.live is None:  # the answer goes on after a progress line
            from ._markdown import LiveMarkdown

            self.live = LiveMarkdown.for_stream(self.stream)
            self.answer_open = True
        self.live.feed(text)

    def paint_delay(self) -> float | None:
        """Seconds until a streaming markdown answer is due to be redrawn."""
        return self.live.delay() if self.live is not None else None

    def paint(self) -> None:
        if self.live is not None and self.live.dirty:
            self.live.paint()

    def end_answer(self) -> None:
        if self.live is not None:
            self.live.finish()  # ends on a new line
            self.live = None
        elif self.answer_open and not self.markdown:  # (with markdown, the prefix had a line of its own)
            self._write("\n")
        self.answer_open = False

    def prompt(self) -> None:
        self._settle()
        self._write("you> ")

    def ask(self, question: str) -> None:
        """A question whose answer is typed on the same line; until then,
        anything else printed starts on a line of its own."""
        self._settle()
        self._write(self._style(question, "yellow"))
        self.question_open = True
