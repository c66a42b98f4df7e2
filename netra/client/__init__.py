"""netra's Python client library (see :func:`connect`).

Everything it raises is a :class:`ClientError`: :class:`ServerUnreachable`,
:class:`ConnectionRefused`, :class:`ConnectionClosed`, :class:`RunRefused`
or :class:`ProtocolError` (see ``netra/client/_errors.py``).
"""

from ._connection import (
    Connection as Connection,
    RunStream as RunStream,
    connect as connect,
)
from ._errors import (
    ClientError as ClientError,
    ConnectionClosed as ConnectionClosed,
    ConnectionRefused as ConnectionRefused,
    ProtocolError as ProtocolError,
    RunRefused as RunRefused,
    ServerUnreachable as ServerUnreachable,
)
