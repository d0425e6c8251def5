"""The picture store in a directory: `objects/ab/<sha256>`, `tasks/<uuid>.json`,
`expiring/<when>_<uuid>` (tasks whose key keeps pictures for less than the store), and `tmp/`,
where every file is written, flushed and renamed into place (a reader never sees half of one,
and a crash leaves no torn file, only a temporary one that gc removes)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from typing import Any, ContextManager, Iterator

from zimage_tornado.pictures import MANIFEST_LIMIT, Backend

LEFTOVER_SECONDS = 3600.0  # a temporary file this old is a crash's


class Directory(Backend):
    name = "directory"

    def __init__(self, root: str, temporary: bool = False) -> None:
        self.root = root
        self.temporary = temporary  # a directory of its own, removed at close (database :memory:)
        for part in ("objects", "tasks", "tmp", "expiring"):
            os.makedirs(os.path.join(root, part), exist_ok=True)

    def _object(self, digest: str) -> str:
        return os.path.join(self.root, "objects", digest[:2], digest)

    def _manifest(self, uuid: str) -> str:
        return os.path.join(self.root, "tasks", uuid + ".json")

    def _write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"))
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def _read(self, path: str, limit: int) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def put_object(self, digest: str, data: bytes, media_type: str) -> None:
        self._write(self._object(digest), data)

    def refresh_object(self, digest: str, data: bytes) -> bool:
        try:
            os.utime(self._object(digest))
        except FileNotFoundError:
            return False
        return True

    def get_object(self, digest: str, limit: int) -> bytes | None:
        return self._read(self._object(digest), limit)

    def delete_object(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._object(digest))

    def list_objects(self) -> Iterator[tuple[str, int, float]]:
        for sub in os.scandir(os.path.join(self.root, "objects")):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    stat = entry.stat()
                    yield entry.name, stat.st_size, stat.st_mtime

    def put_manifest(self, uuid: str, data: bytes) -> None:
        self._write(self._manifest(uuid), data)

    def get_manifest(self, uuid: str) -> bytes | None:
        return self._read(self._manifest(uuid), MANIFEST_LIMIT)

    def old_manifests(self, before: float) -> Iterator[str]:
        for entry in os.scandir(os.path.join(self.root, "tasks")):
            if entry.name.endswith(".json") and entry.stat().st_mtime < before:
                yield entry.name[:-len(".json")]

    def delete_manifest(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._manifest(uuid))

    def mark_expiry(self, uuid: str, at: float) -> None:
        self._write(os.path.join(self.root, "expiring", "%d_%s" % (at, uuid)), b"")

    def due_expiries(self, now: float) -> Iterator[tuple[str, str]]:
        for entry in os.scandir(os.path.join(self.root, "expiring")):
            at, _, uuid = entry.name.partition("_")
            if at.isdigit() and int(at) <= now:
                yield uuid, entry.path

    def clear_expiry(self, mark: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mark)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(os.path.join(self.root, "tmp", ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def lock(self) -> ContextManager[Any]:
        return self._locked()

    def cleanup(self, now: float) -> None:
        for entry in os.scandir(os.path.join(self.root, "tmp")):
            if entry.name != ".lock" and now - entry.stat().st_mtime > LEFTOVER_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def describe(self) -> str:
        return "directory %s" % self.root
