"""Fault-injection tools, for exercising the runner's failure paths.

Registered only when the server is started with ``NETRA_CHAOS_TOOLS=1``
(``Config.chaos_tools``); the caller decides, this module only builds them.
With them a test or a scripted model can make a tool fail, hang until the
timeout or a cancel, take a known time, or return an oversized result, and
check that the run reports each correctly and stays responsive.

All are async so that a cancellation or timeout is observed at once, with no
worker thread left behind.
"""

from __future__ import annotations

from typing import Any

import trio

from netra.errors import ToolError

from .base import Tool, tool

#: Largest result ``big`` produces: enough to overflow any sane result limit
#: without letting a model allocate without bound.
MAX_BIG_BYTES = 16 * 1024 * 1024
#: Longest ``sleep``: one hour (the tool timeout normally ends it far sooner).
MAX_SLEEP_MS = 3_600_000


async def fail() -> Any:
    """Always fails (chaos testing: a tool raising an unexpected error)."""
    # Deliberately not a ToolError: the runner must also cope with a plain exception.
    raise RuntimeError("chaos: fail")


async def hang() -> Any:
    """Never returns (chaos testing: a tool that only a timeout or a cancel ends)."""
    await trio.sleep_forever()


async def sleep(ms: int) -> dict[str, int]:
    """Waits the given time, then returns (chaos testing: a slow tool).

    Args:
        ms: How long to wait, in milliseconds.
    """
    if not 0 <= ms <= MAX_SLEEP_MS:
        raise ToolError(f"ms must be between 0 and {MAX_SLEEP_MS}")
    await trio.sleep(ms / 1000)
    return {"slept_ms": ms}


async def big(bytes: int) -> str:  # noqa: A002 - the wire name chaos scenarios send: {"bytes": N}
    """Returns a string of the given size in bytes (chaos testing: an oversized result).

    Args:
        bytes: Size of the result, at most 16 MiB.
    """
    if not 0 <= bytes <= MAX_BIG_BYTES:
        raise ToolError(f"bytes must be between 0 and {MAX_BIG_BYTES}")
    return "x" * bytes


def chaos_tools() -> list[Tool]:
    """Fresh Tool objects for the fault-injection tools."""
    return [tool(fail), tool(hang), tool(sleep), tool(big)]
