"""netra's edge with Redis for the cluster: the client it opens, and every
call the leases make.

Every call is bounded by a timeout and shielded from its caller's
cancellation. coredis 6.9 loses a slot of its connection pool for good when
a command is cancelled while its connection is being opened (the first
command after a dropped connection opens one), and a call that always
completes tells its caller for sure whether it took a place. The caller's
cancellation is delivered at its next checkpoint, a round trip later.
For the same reason the client's ``connect_timeout`` must be shorter than
the calls' timeout: a connection that cannot be opened then fails inside
coredis, which frees its slot, instead of being cancelled. Redis's errors,
and the timeout, come out as :class:`~netra.errors.StoreError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import attrs
import coredis
import trio

from ..errors import StoreError
from ._lua import ACQUIRE, COUNT, REFRESH, RELEASE

T = TypeVar("T")

#: What a Redis call can fail with, short of a bug.
_FAILURES: Final = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.TooSlowError)


def redis_client(url: str, *, connect_timeout: float = 2.0, **options: Any) -> coredis.Redis[Any]:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``), to
    be opened with ``async with``. Replies are bytes (``decode_responses``
    off), as the leases expect either way. ``connect_timeout`` stays below a
    LeaseKeeper's timeout (5 s by default): see this module's docstring."""
    return coredis.Redis.from_url(url, connect_timeout=connect_timeout, **options)


def as_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@attrs.define(eq=False)
class LeaseScripts:
    """The scripts, registered on one client (``EVALSHA``, loaded again by
    coredis if Redis forgot them), behind typed calls."""

    redis: coredis.Redis[Any]
    _acquire: Any = attrs.field(init=False)
    _refresh: Any = attrs.field(init=False)
    _release: Any = attrs.field(init=False)
    _count: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._acquire = self.redis.register_script(ACQUIRE)
        self._refresh = self.redis.register_script(REFRESH)
        self._release = self.redis.register_script(RELEASE)
        self._count = self.redis.register_script(COUNT)

    async def call(self, send: Callable[[], Awaitable[T]], timeout: float) -> T:
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(timeout):
                    return await send()
            except _FAILURES as exc:
                raise StoreError(f"the cluster store (Redis) did not answer: {exc!r}") from exc

    async def ping(self, timeout: float) -> None:
        await self.call(self.redis.ping, timeout)

    async def acquire(
        self, key: str, token: str, total: int, ttl_ms: int, timeout: float,
        *, channel: str, name: str, released: Iterable[str] = (),
    ) -> tuple[bool, float]:
        """Whether ``token`` took a place, after removing the ``released``
        tokens; if not, seconds until the soonest holder's lease expires."""
        args = [token, total, ttl_ms, channel, name, *released]
        taken, value = await self.call(lambda: self._acquire(keys=[key], args=args), timeout)
        return bool(taken), int(value) / 1000

    async def refresh(self, tokens: Mapping[str, Iterable[str]], ttl_ms: int, timeout: float) -> set[str]:
        """Extend the live ones of ``tokens`` (key -> tokens); the others
        (lost) are returned."""
        keys: list[str] = []
        args: list[Any] = [ttl_ms]
        for key, of_key in tokens.items():
            of_key = list(of_key)
            keys.append(key)
            args += [len(of_key), *of_key]
        lost = await self.call(lambda: self._refresh(keys=keys, args=args), timeout)
        return {as_text(token) for token in lost}

    async def release(
        self, channel: str, tokens: Mapping[tuple[str, str], Iterable[str]], timeout: float
    ) -> int:
        """Remove ``tokens`` ((key, name) -> tokens) and announce on
        ``channel`` each resource that got places back; how many did."""
        keys: list[str] = []
        args: list[Any] = [channel]
        for (key, name), of_key in tokens.items():
            of_key = list(of_key)
            keys.append(key)
            args += [name, len(of_key), *of_key]
        return int(await self.call(lambda: self._release(keys=keys, args=args), timeout))

    async def count(self, key: str, timeout: float) -> int:
        return int(await self.call(lambda: self._count(keys=[key], args=[]), timeout))
