"""Pictures that outlive their links: every finished task's pictures, fetched once and kept.

The shelf is a directory: `objects/ab/<sha256>` for the pictures (named by their content, so a
picture is written once however many tasks share it), `tasks/<uuid>.json` for what each task
holds (its pictures' hashes, media types and sizes, when they were kept, and the provider's
links as `source_urls`). Every file is written to `tmp/` and renamed into place, so a reader
never sees half of one and a crash leaves no torn file. The budget (`pictures_max_bytes`) and
age (`pictures_ttl`) are applied after each write: the oldest pictures go first, and a task
whose picture is gone answers 410 picture_expired.

The keeper fetches a task's pictures the moment the engine sees it complete, whether anyone
waits or not; a read that arrives during the fetch joins it. At start, completed tasks recorded
without their pictures (a crash between completion and the fetch) are fetched again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from zimage_tornado.errors import ApiError
from zimage_tornado.images import ByteBoundedCache, Conversions, NotAPicture
from zimage_tornado.store import Store, TaskQuery, utc_day
from zimage_tornado.upstream import UpstreamBadResponse

log = logging.getLogger("zimage_tornado.pictures")

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
RESUMED_AT_MOST = 10_000  # completed tasks checked for missing pictures at start
RESCAN_SECONDS = 300.0  # other processes sharing the directory: their pictures are counted this often


@dataclass(frozen=True)
class Kept:
    """One kept picture of a task."""

    sha256: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Manifest:
    uuid: str
    kept_at: float
    pictures: tuple[Kept, ...]
    source_urls: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "kept_at": self.kept_at, "source_urls": list(self.source_urls),
                "pictures": [{"sha256": p.sha256, "type": p.media_type, "bytes": p.size} for p in self.pictures]}

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Manifest:
        pictures = tuple(Kept(str(p["sha256"]), str(p["type"]), int(p["bytes"])) for p in data["pictures"])
        if not all(DIGEST_RE.match(p.sha256) for p in pictures):
            raise ValueError("a picture's name is not a SHA-256")
        return cls(str(data["uuid"]), float(data["kept_at"]), pictures, tuple(str(u) for u in data["source_urls"]))


class PictureGone(ApiError):
    def __init__(self, uuid: str, index: int) -> None:
        super().__init__(410, "Picture %d of task %s is no longer kept (pictures_ttl or pictures_max_bytes); "
                              "generate it again" % (index, uuid), param="index", code="picture_expired")


class Shelf:
    """The directory. Its methods block (file I/O): the keeper runs them on its own thread."""

    def __init__(self, root: str, max_bytes: int, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.counters: Counter[str] = Counter()
        for part in ("objects", "tasks", "tmp"):
            os.makedirs(os.path.join(root, part), exist_ok=True)
        self._index: dict[str, tuple[int, float]] = {}  # sha256 -> (bytes, kept at)
        self._scanned = 0.0
        self.scan()

    def _object(self, digest: str) -> str:
        return os.path.join(self.root, "objects", digest[:2], digest)

    def _manifest(self, uuid: str) -> str:
        return os.path.join(self.root, "tasks", uuid.lower() + ".json")

    def _write(self, path: str, data: bytes) -> None:
        """Written whole or not at all: a temporary file, flushed to disk, renamed into place."""
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

    def _locked(self) -> Any:
        """Processes sharing the directory write and evict one at a time."""
        lock = open(os.path.join(self.root, "tmp", ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def scan(self) -> None:
        """The index of what is on disk (at start, and every RESCAN_SECONDS for other processes' writes)."""
        index: dict[str, tuple[int, float]] = {}
        objects = os.path.join(self.root, "objects")
        for sub in os.scandir(objects):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if DIGEST_RE.match(entry.name):
                    stat = entry.stat()
                    index[entry.name] = (stat.st_size, stat.st_mtime)
        self._index = index
        self._scanned = self.clock()

    def put(self, uuid: str, pictures: list[tuple[bytes, str]], source_urls: tuple[str, ...]) -> Manifest:
        """Keeps a task's pictures and then its manifest; applies the budget and age after."""
        now = self.clock()
        kept = []
        with self._locked():
            for data, media_type in pictures:
                digest = hashlib.sha256(data).hexdigest()
                path = self._object(digest)
                if os.path.exists(path):
                    os.utime(path)  # kept again: young again
                else:
                    self._write(path, data)
                self._index[digest] = (len(data), now)
                kept.append(Kept(digest, media_type, len(data)))
                self.counters["stored"] += 1
            manifest = Manifest(uuid, now, tuple(kept), source_urls)
            self._write(self._manifest(uuid), json.dumps(manifest.as_dict()).encode())
            self._settle(now)
        return manifest

    def manifest(self, uuid: str) -> Manifest | None:
        try:
            with open(self._manifest(uuid), "rb") as f:
                return Manifest.parse(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("task %s: its picture manifest is unreadable (%s); fetching its pictures again", uuid, e)
            return None

    def read(self, manifest: Manifest, index: int) -> bytes:
        """A kept picture's bytes; PictureGone once it was removed (age or budget)."""
        picture = manifest.pictures[index]
        if self.ttl and self.clock() - manifest.kept_at > self.ttl:
            raise PictureGone(manifest.uuid, index)
        try:
            with open(self._object(picture.sha256), "rb") as f:
                data = f.read(picture.size + 1)
        except FileNotFoundError:
            raise PictureGone(manifest.uuid, index) from None
        if len(data) != picture.size:  # not what was kept: never served as if it were
            raise PictureGone(manifest.uuid, index)
        return data

    def _settle(self, now: float) -> None:
        """Removes pictures past the age, then the oldest until the rest fits the budget."""
        if now - self._scanned > RESCAN_SECONDS:
            self.scan()
        order = sorted(self._index.items(), key=lambda item: item[1][1])
        total = sum(size for _, (size, _) in order)
        for digest, (size, kept_at) in order:
            old = bool(self.ttl) and now - kept_at > self.ttl
            if not old and (not self.max_bytes or total <= self.max_bytes):
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._object(digest))
            del self._index[digest]
            total -= size
            self.counters["expired" if old else "evicted"] += 1

    def gc(self) -> dict[str, int]:
        """The budget and age applied now, and manifests of tasks past the age removed."""
        now = self.clock()
        with self._locked():
            self.scan()
            self._settle(now)
            if self.ttl:
                for entry in os.scandir(os.path.join(self.root, "tasks")):
                    if entry.name.endswith(".json") and now - entry.stat().st_mtime > self.ttl:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
            for entry in os.scandir(os.path.join(self.root, "tmp")):  # a crash's leftovers
                if entry.name != ".lock" and now - entry.stat().st_mtime > 3600:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return self.usage()

    def usage(self) -> dict[str, Any]:
        oldest = min((kept_at for _, kept_at in self._index.values()), default=None)
        return {"bytes": sum(size for size, _ in self._index.values()), "pictures": len(self._index),
                "budget_bytes": self.max_bytes, "ttl_seconds": self.ttl, "oldest_kept_at": oldest,
                "stored": self.counters["stored"], "evicted": self.counters["evicted"],
                "expired": self.counters["expired"]}


class Keeper:
    """Fetches, checks and keeps a task's pictures once, and serves them."""

    def __init__(self, shelf: Shelf, *, fetch: Callable[[str], Awaitable[bytes]], conversions: Conversions,
                 max_side: int, cache_bytes: int, temporary: bool = False) -> None:
        self.shelf = shelf
        self.fetch = fetch  # one URL's bytes, through the image fetcher's rules (public hosts, size limit)
        self.conversions = conversions
        self.max_side = max_side
        self.temporary = temporary  # a directory of its own, removed at close (database :memory:)
        self.failed = 0
        self.cache = ByteBoundedCache(cache_bytes)  # pictures being served, shared by every client
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="picture-store")
        self._keeping: dict[str, asyncio.Future[Manifest]] = {}
        self._reading: dict[str, asyncio.Future[bytes]] = {}
        self._background: set[asyncio.Future[Manifest]] = set()

    async def _io(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    def start(self, uuid: str, urls: tuple[str, ...]) -> None:
        """Keeps the task's pictures in the background (the engine just saw it complete)."""
        future = self._join(uuid, urls)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _join(self, uuid: str, urls: tuple[str, ...]) -> asyncio.Future[Manifest]:
        pending = self._keeping.get(uuid)
        if pending is None:
            # a context of its own: the first request's id must not tag the fetch's log lines
            pending = asyncio.get_running_loop().create_task(self._keep(uuid, urls), context=contextvars.Context())
            self._keeping[uuid] = pending
            pending.add_done_callback(lambda done: self._kept(uuid, done))
        return pending

    def _kept(self, uuid: str, done: asyncio.Future[Manifest]) -> None:
        self._keeping.pop(uuid, None)
        if not done.cancelled() and done.exception() is not None:
            self.failed += 1
            log.warning("task %s: its pictures could not be kept: %s", uuid, done.exception())

    async def _keep(self, uuid: str, urls: tuple[str, ...]) -> Manifest:
        existing = await self._io(self.shelf.manifest, uuid)
        if existing is not None:
            return existing
        if not urls:
            raise UpstreamBadResponse("Task %s completed without pictures" % uuid)
        fetched = await asyncio.gather(*(self.fetch(url) for url in urls))
        pictures = []
        for index, data in enumerate(fetched):
            try:
                pictures.append((data, await self.conversions.identify(data, self.max_side)))
            except NotAPicture as e:
                raise UpstreamBadResponse("Picture %d of task %s is not kept: %s" % (index, uuid, e)) from e
        manifest: Manifest = await self._io(self.shelf.put, uuid, pictures, tuple(urls))
        log.info("task %s: %d pictures kept", uuid, len(pictures))
        return manifest

    async def manifest(self, uuid: str, urls: Callable[[], Awaitable[tuple[str, ...]]]) -> Manifest:
        """The task's kept pictures: kept now (joining a fetch in flight) if they are not yet;
        `urls` gives the provider's links then."""
        pending = self._keeping.get(uuid)
        if pending is not None:
            return await asyncio.shield(pending)
        manifest: Manifest | None = await self._io(self.shelf.manifest, uuid)
        if manifest is not None:
            return manifest
        return await asyncio.shield(self._join(uuid, await urls()))

    async def read(self, manifest: Manifest, index: int) -> bytes:
        """A kept picture's bytes: from the cache, or one read from disk shared by every client
        asking meanwhile (sixty clients of a 15 MiB picture hold one copy, not sixty)."""
        digest = manifest.pictures[index].sha256
        cached = self.cache.get(digest)
        if cached is not None:
            return bytes(cached)
        pending = self._reading.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._io(self.shelf.read, manifest, index))
            self._reading[digest] = pending
            pending.add_done_callback(lambda done: self._read(digest, done))
        data: bytes = await asyncio.shield(pending)
        return data

    def _read(self, digest: str, done: asyncio.Future[bytes]) -> None:
        self._reading.pop(digest, None)
        if not done.cancelled() and done.exception() is None:
            self.cache.put(digest, done.result())

    async def resume(self, store: Store, now: float) -> int:
        """Completed tasks recorded within the age whose pictures are not kept (a crash between
        the completion and the fetch): kept now, in the background. Returns how many."""
        since = utc_day(now - self.shelf.ttl) if self.shelf.ttl else None
        records = await store.find_tasks(TaskQuery(status="completed", since=since, limit=RESUMED_AT_MOST))
        missing = [record for record in records
                   if record.image_urls and await self._io(self.shelf.manifest, record.uuid) is None]
        for record in missing:
            self.start(record.uuid, tuple(record.image_urls[:record.batch_size]))
        if missing:
            log.info("keeping the pictures of %d completed tasks not kept before a restart", len(missing))
        return len(missing)

    async def gc(self) -> dict[str, int]:
        usage: dict[str, int] = await self._io(self.shelf.gc)
        return usage

    async def close(self) -> None:
        for future in list(self._keeping.values()):
            future.cancel()
        await asyncio.gather(*self._keeping.values(), return_exceptions=True)
        self._thread.shutdown(wait=True)
        if self.temporary:
            shutil.rmtree(self.shelf.root, ignore_errors=True)
