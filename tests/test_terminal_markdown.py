"""``netra chat`` renders answers as markdown on a terminal, and only there.

What a terminal shows is checked on a terminal emulator (pyte) fed the exact
bytes written, since a live region is drawn with cursor movements: the text
in the byte stream is not what the screen ends up showing. The unit tests
drive :class:`LiveMarkdown` with a fake clock; the end-to-end ones run
``python -m netra chat`` in a pseudo-terminal (see test_terminal_client).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest
import trio

from netra.client._markdown import MIN_INTERVAL_S, LiveMarkdown
from netra.client.terminal import FANCY, Chat, Output, strip_controls
from netra.testing import config_for_tests, open_server, token_for
from netra.tools import tool

from .test_terminal_client import ROOT, STEP_S, child_env, finish, in_thread

pyte = pytest.importorskip("pyte", reason="the pyte package is not installed")
pexpect = pytest.importorskip("pexpect", reason="the pexpect package is not installed")

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

ANSWER = (
    "## Release notes\n\n- **fast** start\n- a `code` span\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "| name | score |\n|:-----|------:|\n| ada | 3 |\n\n"
    "See [the docs](https://example.com/docs).\n"
)
#: The same, in parts of whole blocks for the `md` tool. The scripted model
#: answers "Here is what I found…: md returned <part>; md returned <part>…",
#: quoting at most 200 characters of each: the blank lines around a part keep
#: the words between them out of its blocks.
_CUTS = (0, ANSWER.index("```"), ANSWER.index("| name"), len(ANSWER))
PARTS = {name: "\n\n" + ANSWER[a:b] + "\n" for name, a, b in zip(("notes", "code", "table"), _CUTS, _CUTS[1:])}
assert all(len(p) <= 200 for p in PARTS.values())
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@tool
async def md(part: str) -> str:
    """A piece of markdown for the model to quote."""
    return PARTS[part]


class Terminal:
    """A screen fed what a program writes, as a terminal's line discipline
    would pass it (a newline also returns the carriage: ONLCR)."""

    def __init__(self, columns: int, rows: int) -> None:
        self.screen = pyte.HistoryScreen(columns, rows, history=10_000)
        self.stream = pyte.Stream(self.screen)
        self.columns, self.rows = columns, rows
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)
        self.stream.feed(text.replace("\n", "\r\n"))

    def lines(self) -> list[str]:
        """Everything scrolled off the top, then the screen, without trailing blank lines."""
        def row(line) -> str:
            return "".join(line[x].data for x in range(self.columns)).rstrip()

        lines = [row(line) for line in self.screen.history.top] + [line.rstrip() for line in self.screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live_on(terminal: Terminal, clock: Clock) -> LiveMarkdown:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, color_system="256", legacy_windows=False)
    return LiveMarkdown(
        console=console, write=terminal.write,
        size=lambda: os.terminal_size((terminal.columns, terminal.rows)), clock=clock,
    )


def rendered_at_once(text: str, columns: int) -> list[str]:
    terminal = Terminal(columns, 500)
    live = live_on(terminal, Clock())
    live.text = text
    return [ANSI.sub("", line).rstrip() for line in live.render(columns - 1)]


def stream_into(live: LiveMarkdown, clock: Clock, text: str, *, step_s: float = 0.004, size: int = 3) -> None:
    """Feed the text a few characters at a time, redrawing when the chat would."""
    for i in range(0, len(text), size):
        clock.now += step_s
        if (delay := live.delay()) is not None and delay <= 0:
            live.paint()  # the chat's deferred redraw
        live.feed(text[i:i + size])
    live.finish()


# -- the live region -----------------------------------------------------------------


def test_a_streamed_answer_ends_exactly_as_if_rendered_at_once():
    terminal, clock = Terminal(80, 40), Clock()
    stream_into(live_on(terminal, clock), clock, ANSWER)
    screen = terminal.lines()
    assert screen == rendered_at_once(ANSWER, 80)
    text = "\n".join(screen)
    assert "Release notes" in text and "• fast start" in text
    assert "def add(a, b):" in text and "return a + b" in text
    assert re.search(r"ada\s+3", text) and "the docs (https://example.com/docs)" in text
    assert "**" not in text and "```" not in text and "|--" not in text
    assert terminal.screen.cursor.x == 0  # finished on a line of its own


def test_an_unclosed_fence_streams_as_code():
    terminal, clock = Terminal(60, 20), Clock()
    live = live_on(terminal, clock)
    live.feed("Here:\n\n```python\ndef add(a, b):\n")
    shown = "\n".join(terminal.lines())
    assert "def add(a, b):" in shown and "```" not in shown


def test_an_answer_taller_than_the_screen_scrolls_away_once():
    """Lines that no longer fit are written for good above the region: the
    whole answer is there once, in order, the screen holding its end."""
    text = "".join(f"{i}. line number {i}\n" for i in range(1, 61)) + "\nthe **end**\n"
    terminal, clock = Terminal(50, 12), Clock()
    stream_into(live_on(terminal, clock), clock, text)
    assert terminal.lines() == rendered_at_once(text, 50)
    assert terminal.screen.display[-2].rstrip() == "the end"


def test_redraws_are_throttled_and_the_last_one_is_never_lost():
    terminal, clock = Terminal(80, 30), Clock()
    live = live_on(terminal, clock)
    for _ in range(1000):  # 1000 deltas in one second
        clock.now += 0.001
        if (delay := live.delay()) is not None and delay <= 0:
            live.paint()
        live.feed("word ")
    paints = len(terminal.writes)
    assert paints <= 1.0 / 0.05 + 2, paints
    assert live.delay() is not None  # text is waiting: a redraw is due later
    clock.now += 1.0
    assert live.delay() == 0
    live.paint()
    assert live.delay() is None  # nothing new: nothing to draw
    assert "\n".join(terminal.lines()).count("word") == 1000


def test_control_characters_never_reach_the_terminal():
    terminal, clock = Terminal(80, 20), Clock()
    live = live_on(terminal, clock)
    live.feed("safe \x1b]0;pwned\x07 \x1b]52;c;aGk=\x07 \x1b[2J\x9b2J text\r\x08\x00 end\n")
    live.finish()
    written = "".join(terminal.writes)
    assert "\x07" not in written and "\x1b]" not in written and "\x9b" not in written and "\x08" not in written
    assert "\x1b[2J" not in written
    assert strip_controls("a\tb\nc\x1bd\x7f") == "a\tb\ncd"
    assert "safe" in "\n".join(terminal.lines()) and "end" in "\n".join(terminal.lines())


def test_plain_answers_on_a_terminal_lose_their_control_characters_but_not_in_a_pipe(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    text = "a \x1b]0;pwned\x07b\r\n"
    for stream, expected in ((FakeTty(), "a ]0;pwnedb\n"), (io.StringIO(), text)):
        out = Output.for_stream(stream)
        assert not out.markdown
        out.chunk(text)
        assert stream.getvalue() == expected


class FakeTty(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


class TerminalStream(FakeTty):
    """stdout on a terminal."""

    def __init__(self, terminal: Terminal) -> None:
        super().__init__()
        self.terminal = terminal

    def write(self, text: str) -> int:
        self.terminal.write(text)
        return len(text)


@pytest.mark.parametrize(
    ("tty", "env", "plain", "markdown"),
    [
        pytest.param(True, {"TERM": "xterm-256color"}, False, True, id="terminal"),
        pytest.param(True, {"TERM": "xterm-256color"}, True, False, id="--plain"),
        pytest.param(True, {"TERM": "xterm-256color", "NO_COLOR": "1"}, False, False, id="NO_COLOR"),
        pytest.param(True, {"TERM": "dumb"}, False, False, id="TERM=dumb"),
        pytest.param(False, {"TERM": "xterm-256color"}, False, False, id="pipe"),
    ],
)
def test_when_answers_are_rendered(monkeypatch, tty, env, plain, markdown):
    monkeypatch.delenv("NO_COLOR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stream = FakeTty() if tty else io.StringIO()
    out = Output.for_stream(stream, plain=plain)
    assert out.markdown is markdown
    out.begin_answer("assistant> ")
    out.chunk("some **bold** text")
    out.end_answer()
    written = stream.getvalue()
    assert ("**bold**" in written) is not markdown
    if not tty:
        assert written == "assistant> some **bold** text\n"  # exactly as before


def test_a_progress_line_between_two_parts_of_an_answer():
    """Text, then a tool call, then more text: each part is rendered where
    it came, and the progress line stays between them."""
    terminal = Terminal(80, 30)
    out = Output(stream=TerminalStream(terminal), tty=True, color=True, symbols=FANCY, markdown=True)
    out.begin_answer("assistant> ")
    out.chunk("First, *a look*:")
    out.status("⚙ search …")
    out.line("⚙ search → 3 hits (5 ms)")
    out.chunk("- one\n- two")
    out.end_answer()
    out.prompt()
    assert terminal.lines() == ["assistant>", "First, a look:", "⚙ search → 3 hits (5 ms)", " • one", " • two", "you>"]


async def test_an_answer_waiting_for_its_redraw_is_drawn_without_more_text():
    """Text that came too soon after a redraw is drawn when the redraw is
    due, even when nothing else arrives (a model pausing mid-answer)."""
    terminal = Terminal(80, 20)
    out = Output(stream=TerminalStream(terminal), tty=True, color=True, symbols=FANCY, markdown=True)
    chat = Chat(conn=None, out=out)  # type: ignore[arg-type]  # no connection needed to draw
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            chat._nursery = nursery
            out.begin_answer("assistant> ")
            out.chunk("first")
            out.chunk(" and **second**")  # within the interval: not drawn yet
            assert terminal.lines()[-1] == "first"
            chat._paint_soon()
            chat._paint_soon()  # one waiting redraw at most
            assert chat.painting
            await trio.sleep(MIN_INTERVAL_S * 4)
            assert terminal.lines()[-1] == "first and second"
            assert not chat.painting
            out.end_answer()


# -- netra chat, end to end -------------------------------------------------------------


def chat_env(**changes: str | None) -> dict[str, str]:
    env = child_env()
    env.pop("NO_COLOR", None)
    env.update(TERM="xterm-256color")
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def ask() -> str:
    return "notes " + " ".join(f"[[tool:md {json.dumps({'part': p})}]]" for p in PARTS) + " [[stream:40]]"


def chat_screen(url: str, token: str, env: dict[str, str], *extra: str) -> tuple[list[str], str]:
    """Run one exchange in a 100x40 terminal: the screen it left, and its bytes."""
    log = io.StringIO()
    child = pexpect.spawn(
        sys.executable, ["-m", "netra", "chat", "--url", url, "--token", token, *extra],
        env=env, cwd=str(ROOT), encoding="utf-8", timeout=STEP_S, dimensions=(40, 100),
    )
    child.logfile_read = log
    try:
        child.expect_exact("you> ")
        child.sendline(ask())
        child.expect_exact("assistant>")
        child.expect_exact("you> ")
        child.sendeof()
        assert finish(child) == 0
    finally:
        child.close(force=True)
    terminal = Terminal(100, 40)
    terminal.stream.feed(log.getvalue())  # a real pty: newlines already return the carriage
    return terminal.lines(), log.getvalue()


async def test_chat_renders_markdown_on_a_terminal():
    async with open_server(config_for_tests(scripted_delay_ms=20), extra_tools=[md]) as server:
        token = token_for(server, "ada")
        lines, raw = await in_thread(chat_screen, server.ws_url, token, chat_env())
    text = "\n".join(lines)
    start = lines.index("assistant>")
    answer = "\n".join(lines[start + 1:])
    assert "Here is what I found for “notes”: md returned" in answer
    assert "Release notes" in answer and "• fast start" in answer and "def add(a, b):" in answer
    assert re.search(r"ada\s+3", answer)
    assert "**" not in answer and "```" not in answer, text
    assert answer.count("def add(a, b):") == 1  # redrawn in place, never repeated
    assert "\x1b[" in raw  # colours and cursor movements: it was rendered
    assert lines[-1].startswith("you>")


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        pytest.param(["--plain"], {}, id="--plain"),
        pytest.param([], {"NO_COLOR": "1"}, id="NO_COLOR"),
        pytest.param([], {"TERM": "dumb"}, id="TERM=dumb"),
    ],
)
async def test_chat_prints_the_answer_as_written_when_asked_to(extra, env):
    async with open_server(config_for_tests(), extra_tools=[md]) as server:
        token = token_for(server, "bo")
        lines, _ = await in_thread(chat_screen, server.ws_url, token, chat_env(**env), *extra)
    text = "\n".join(lines)
    assert "assistant> Here is what I found" in text
    assert "- **fast** start" in text and "```python" in text and "|:-----|------:|" in text


async def test_piped_output_stays_plain_text():
    async with open_server(config_for_tests(), extra_tools=[md]) as server:
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-m", "netra", "chat", "--url", server.ws_url, "--token", token_for(server, "cy")],
                stdin=(ask() + "\n").encode(), capture_stdout=True, capture_stderr=True, check=False,
                env=chat_env(), cwd=str(ROOT),
            )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "\x1b" not in out
    assert "- **fast** start\n- a `code` span" in out and "```python\ndef add(a, b):" in out
