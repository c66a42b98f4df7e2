"""Tools from MCP servers (see docs/mcp.md).

- :mod:`.config`: the ``mcp_servers`` setting;
- :mod:`.tools`: MCP tools as netra tools (names, argument checks);
- :mod:`.connection`: one server's connection, kept open and reopened;
- :mod:`.servers`: every server, and which agents get which tools;
- :mod:`.client`: the edge to the MCP SDK (imported only when servers are configured).

This package imports only :mod:`.config` eagerly: ``netra.config`` needs it,
and every ``netra`` command loads that.
"""

from .config import McpServerConfig as McpServerConfig
from .config import parse_mcp_servers as parse_mcp_servers
