"""netra's Python client library (see :func:`connect`)."""

from ._connection import (
    ClientError as ClientError,
    Connection as Connection,
    ConnectionClosed as ConnectionClosed,
    RunRefused as RunRefused,
    connect as connect,
)
