"""The one error of netra's own that MCP adds."""

from __future__ import annotations

from ..errors import ToolError


class McpUnavailable(ToolError):
    """An MCP server cannot be started or reached, or its connection broke.

    A ToolError, so wherever it ends up the run sees a failed tool call; the
    connection that raises it also starts reconnecting."""
