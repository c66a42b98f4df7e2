"""netra's Python client library (see :func:`connect`).

Everything it raises is a :class:`ClientError`: :class:`ServerUnreachable`,
:class:`ConnectionRefused`, :class:`ConnectionClosed`, :class:`RunRefused`,
:class:`DecisionRefused` or :class:`ProtocolError` (see
``netra/client/_errors.py``). A run whose tool call needs the user's
approval yields an event whose ``.event`` is an :class:`ApprovalRequired`;
answer it with :meth:`Connection.decide`.
"""

from ._connection import (
    Connection as Connection,
    RunStream as RunStream,
    connect as connect,
)
from ..protocol import ApprovalRequired as ApprovalRequired
from ._errors import (
    ClientError as ClientError,
    ConnectionClosed as ConnectionClosed,
    ConnectionRefused as ConnectionRefused,
    DecisionRefused as DecisionRefused,
    ProtocolError as ProtocolError,
    RunRefused as RunRefused,
    ServerUnreachable as ServerUnreachable,
)
