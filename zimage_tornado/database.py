"""One owner of a SQLite file: a gateway holds an exclusive lock on `<database>.lock` for as long
as it (and the workers it forks, which inherit the open file) runs. A second, independent gateway
on the same file would keep limits and idempotency in its own memory and double them, so it is
refused at start, naming the file and the process that holds it."""

from __future__ import annotations

import fcntl
import os
from typing import IO

from zimage_tornado.store.sqlite import prepare

__all__ = ["InUse", "own", "prepare"]

_held: list[IO[str]] = []  # kept open (and so locked) for the life of the process


class InUse(Exception):
    """Another gateway owns the database."""


def own(path: str) -> IO[str]:
    """Takes the database's lock, or raises InUse naming who holds it."""
    lock_path = path + ".lock"
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()[:40] or "unknown"
        handle.close()
        raise InUse("the database %s is in use by another gateway (pid %s, lock %s); two gateways on one file "
                    "would each count limits on their own. Stop it, give this one another --database, or share "
                    "state through --redis_url" % (path, holder, lock_path)) from None
    handle.seek(0)
    handle.truncate()
    handle.write("%d\n" % os.getpid())
    handle.flush()
    _held.append(handle)
    return handle
