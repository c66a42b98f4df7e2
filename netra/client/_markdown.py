"""Answers rendered as markdown in a terminal, while they stream.

``netra chat`` uses this when its output is a terminal that takes colour
(not ``NO_COLOR``, not ``TERM=dumb``, no ``--plain``). The answer so far is
rendered with rich's ``Markdown`` into a live region at the bottom of the
screen, which is redrawn in place (cursor up, clear to the end of the screen,
inside a synchronized update where the terminal supports one) at most every
50 ms, and less often for a long answer: a redraw waits five times as long
as the last render took, so rendering never takes more than a fifth of the
time. The answer therefore reads as markdown from its first line, and an
unclosed code fence is a code block to the end, as CommonMark says.

The region is at most a screenful. Lines above it are written for good and
scroll away; they cannot be redrawn, so an answer taller than the screen
keeps its top as it was when it scrolled off (a table still growing up there
keeps its earlier column widths); the last screenful is always exact. When
the answer ends it is drawn once more, complete, and left on screen. (A
terminal resized while an answer streams, or a line typed and echoed then,
moves the region under it: a stale line or two may stay above the answer;
what follows is drawn right.)

Control characters in an answer (escape sequences, carriage returns, bells)
are removed before rendering (as ``Output`` does for plain answers on a
terminal): they could move the cursor under the region, and a model has no
business setting the terminal's title or clipboard.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from typing import TextIO

import attrs
from rich.console import Console
from rich.markdown import Markdown

from .terminal import strip_controls

#: Shortest and longest wait between two redraws of a streaming answer.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 1.0
#: A redraw waits this many times the last render's duration.
RENDER_SHARE = 5

_SYNC_ON, _SYNC_OFF = "\033[?2026h", "\033[?2026l"  # ignored by terminals without it


@attrs.define(eq=False)
class LiveMarkdown:
    """One answer (or the part of it after an interruption) on screen.

    :meth:`feed` adds text and redraws when a redraw is due; when one is not,
    :meth:`delay` says how long until it is, and the caller calls
    :meth:`paint` then. :meth:`finish` draws the whole text and ends with the
    cursor at the start of a new line."""

    console: Console
    write: Callable[[str], None]
    size: Callable[[], os.terminal_size] = shutil.get_terminal_size
    clock: Callable[[], float] = time.monotonic
    text: str = ""
    dirty: bool = False
    shown: int = 0  # lines of the region on screen, the cursor at the end of the last
    committed: int = 0  # rendered lines written for good above the region
    painted_at: float = -math.inf
    interval: float = MIN_INTERVAL_S

    @classmethod
    def for_stream(cls, stream: TextIO) -> LiveMarkdown:
        console = Console(file=stream, force_terminal=True, legacy_windows=False, highlight=False)

        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        return cls(console=console, write=write)

    def feed(self, delta: str) -> None:
        self.text += strip_controls(delta)
        self.dirty = True
        if self.delay() == 0:
            self.paint()

    def delay(self) -> float | None:
        """Seconds until the next redraw is due; None when none is needed."""
        if not self.dirty:
            return None
        return max(0.0, self.painted_at + self.interval - self.clock())

    def render(self, width: int) -> list[str]:
        """The text as terminal lines (with their colour codes), at most
        ``width`` columns each, without blank lines before or after."""
        with self.console.capture() as capture:
            self.console.print(Markdown(self.text, hyperlinks=False), width=width)
        lines = capture.get().split("\n")
        start, end = 0, len(lines)
        while start < end and not lines[start].strip():
            start += 1  # rich starts a list with one
        while end > start and not lines[end - 1].strip():
            end -= 1
        return lines[start:end]

    def paint(self, *, final: bool = False) -> None:
        started = self.clock()
        columns, rows = self.size()
        # one column spare: a line that fills the width would wrap, or leave
        # the cursor in a state where the next newline counts twice
        lines = self.render(max(20, columns - 1))
        room = max(1, rows - 2)  # the region, with the prompt's line to spare
        keep = len(lines) if final else max(self.committed, len(lines) - room)
        parts = [_SYNC_ON, "\r"]
        if self.shown > 1:
            parts.append(f"\033[{self.shown - 1}A")
        parts.append("\033[J")
        parts.extend(line + "\n" for line in lines[self.committed:keep])
        live = lines[keep:]
        parts.append("\n".join(live))
        parts.append(_SYNC_OFF)
        self.write("".join(parts))
        self.committed = max(self.committed, keep)
        self.shown = len(live)
        self.dirty = False
        self.painted_at = self.clock()
        self.interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, RENDER_SHARE * (self.painted_at - started)))

    def finish(self) -> None:
        """Draw the complete text, for good; the cursor ends on a new line."""
        self.paint(final=True)
