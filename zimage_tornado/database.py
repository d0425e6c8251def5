"""One owner of a SQLite file: a gateway holds an exclusive lock on the file itself for as long
as it (and the workers it forks, which inherit the open file) runs. A second, independent gateway
on the same file would keep limits and idempotency in its own memory and double them, so it is
refused at start, naming the file and the process that holds it."""

from __future__ import annotations

import fcntl
import os
from typing import IO

from zimage_tornado.store.sqlite import prepare

__all__ = ["InUse", "own", "prepare"]

_held: list[IO[bytes]] = []  # kept open (and so locked) for the life of the process


class InUse(Exception):
    """Another gateway owns the database."""


def own(path: str) -> IO[bytes]:
    """Takes the database's lock, or raises InUse naming who holds it.

    The lock is a flock() on the database file itself, so it follows the file whatever name
    reaches it: a symlink (blue/green deploys) or a hard link is the same file and is refused.
    SQLite's own locks are fcntl() locks, which flock() neither sees nor disturbs. The holder's
    pid is written beside the resolved file, for the message."""
    real = os.path.realpath(path)
    handle = open(real, "ab")  # creates an empty file where there was none: SQLite takes it as a new database
    note = real + ".lock"
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(os.fstat(handle.fileno())) or note_of(note)
        handle.close()
        named = path if real == os.path.abspath(path) else "%s (the file %s)" % (path, real)
        raise InUse("the database %s is in use by another gateway (pid %s); two gateways on one file "
                    "would each count limits on their own. Stop it, give this one another --database, or share "
                    "state through --redis_url" % (named, holder)) from None
    with open(note, "w", encoding="utf-8") as f:
        f.write("%d\n" % os.getpid())
    _held.append(handle)
    return handle


def lock_holder(info: os.stat_result) -> str | None:
    """The pid holding a flock() on the file, from the kernel's list (Linux), whatever its name."""
    try:
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK":
                    major, minor, inode = fields[5].split(":")
                    if (int(inode), int(major, 16), int(minor, 16)) == (
                            info.st_ino, os.major(info.st_dev), os.minor(info.st_dev)):
                        return fields[4]
    except (OSError, ValueError):
        pass
    return None


def note_of(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()[:40] or "unknown"
    except OSError:
        return "unknown"
