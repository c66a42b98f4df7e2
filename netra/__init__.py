"""netra: run AI agents for many chat users at once, over WebSocket, on trio."""

from ._version import __version__ as __version__
