"""netra's own connection handling: the listener that routes each connection,
the WebSocket transport on a socket, and the in-memory transport for tests.

Everything a session needs from a connection is :class:`Transport`."""

from .base import Transport as Transport
from .frames import ProtocolError as ProtocolError
from .handshake import HandshakeError as HandshakeError
from .handshake import UpgradeRequest as UpgradeRequest
from .listener import Listener as Listener
from .listener import ListenerLimits as ListenerLimits
from .memory import Closed as Closed
from .memory import MemoryClient as MemoryClient
from .memory import MemoryTransport as MemoryTransport
from .memory import memory_transport_pair as memory_transport_pair
from .websocket import WebSocketTransport as WebSocketTransport
