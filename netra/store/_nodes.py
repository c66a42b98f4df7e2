"""Which nodes are alive: the processes that write runs into one store.

Every run is recorded with the ``node_id`` of the store that began it. When
a node dies (kill -9, a crash, the machine gone), its runs stay ``running``
and nobody will finish them; a node starting later closes them (see
:meth:`netra.store.base.Store.close_orphaned_runs`). It must not close the
runs of a node that is alive and sharing the database, so liveness is a lock
that the operating system or the database server drops when its holder
dies, however it dies: each node holds a lock named after its id for as long
as its store is open, and a node whose lock can be taken is dead.

SQLite: an exclusive ``flock`` on a file of the node's own in a folder next
to the database (``NAME.nodes/``). PostgreSQL: a session advisory lock held
on a connection of its own (see :mod:`netra.store.postgres`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

import attrs

from ..errors import StoreError


def new_node_id() -> str:
    """A node id for this process: random, so a restarted process is a new
    node and the one it replaces is recognisably dead."""
    return f"node-{uuid.uuid4().hex[:16]}"


class Claims(Protocol):
    """Liveness locks of one store. Blocking: call from a worker thread."""

    def claim(self, node_id: str) -> None:
        """Hold ``node_id``'s lock until :meth:`close`."""

    def take_dead(self, nodes: list[str | None]) -> list[str | None]:
        """Those of ``nodes`` that are dead, with their locks now held here
        (so none of them can come back while its runs are closed). None, the
        node of runs recorded before nodes were, is always dead."""

    def let_go(self, nodes: list[str | None]) -> None:
        """Release the locks :meth:`take_dead` took, and forget those nodes."""

    def close(self) -> None: ...


@attrs.define(eq=False)
class FileClaims:
    """Liveness through ``flock`` on one file per node in ``folder``. The
    kernel releases a lock when its process dies, even by SIGKILL."""

    folder: Path
    timeout_s: float
    _own: tuple[Path, int] | None = attrs.field(default=None, init=False)
    _taken: dict[str, tuple[Path, int]] = attrs.field(factory=dict, init=False)

    def _path(self, node_id: str) -> Path:
        # hashed: a node id is any string, a file name is not
        return self.folder / f"{hashlib.blake2b(node_id.encode(), digest_size=12).hexdigest()}.lock"

    def claim(self, node_id: str) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self._path(node_id)
            deadline = time.monotonic() + self.timeout_s
            while (fd := _lock(path, create=True)) is None:
                if time.monotonic() > deadline:  # only with a node id given twice
                    raise StoreError("another live process holds this node id")
                time.sleep(0.05)
        except OSError as exc:
            raise StoreError("the node lock cannot be created") from exc
        self._own = (path, fd)

    def take_dead(self, nodes: list[str | None]) -> list[str | None]:
        dead: list[str | None] = []
        for node in nodes:
            if node is None:
                dead.append(node)
                continue
            path = self._path(node)
            try:
                fd = _lock(path, create=False)
            except FileNotFoundError:  # never claimed here, or already cleared
                dead.append(node)
                continue
            except OSError as exc:
                raise StoreError("the node locks cannot be read") from exc
            if fd is not None:
                self._taken[node] = (path, fd)
                dead.append(node)
        return dead

    def let_go(self, nodes: list[str | None]) -> None:
        for node in nodes:
            held = self._taken.pop(node, None) if node is not None else None
            if held is not None:
                _unlink_and_unlock(*held)

    def close(self) -> None:
        self.let_go(list(self._taken))
        own, self._own = self._own, None
        if own is not None:
            _unlink_and_unlock(*own)


def _lock(path: Path, *, create: bool) -> int | None:
    """An fd holding ``path``'s exclusive lock, or None when a live process
    holds it. The file is removed (under its lock) once its node is
    forgotten; a lock taken on a file that was removed meanwhile is on the
    wrong file, so try again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        if not create:
            raise FileNotFoundError(path)


def _unlink_and_unlock(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
