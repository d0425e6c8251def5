"""Pictures that outlive their links: every finished task's pictures, fetched once and kept.

The shelf holds the pictures, named by their SHA-256 (a picture is written once however many
tasks share it), and a manifest per task (its pictures' hashes, media types and sizes, when they
were kept, and the provider's links as `source_urls`), in a directory (pictures/directory.py)
or an S3-compatible bucket (pictures/s3.py); either writes a file whole or not at all. The
budget (`pictures_max_bytes`) and age (`pictures_ttl`) are applied after each write: the
oldest pictures go first, and a task whose picture is gone answers 410 picture_expired.

The keeper fetches a task's pictures the moment the engine sees it complete, whether anyone
waits or not; a read that arrives during the fetch joins it. At start, completed tasks recorded
without their pictures (a crash between completion and the fetch) are fetched again.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, ContextManager, Iterator

from zimage_tornado.config import Settings
from zimage_tornado.cache import ResultCache
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
    ttl: float | None = None  # its key's pictures_ttl, when shorter than the store's

    def as_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "kept_at": self.kept_at, "source_urls": list(self.source_urls), "ttl": self.ttl,
                "pictures": [{"sha256": p.sha256, "type": p.media_type, "bytes": p.size} for p in self.pictures]}

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Manifest:
        pictures = tuple(Kept(str(p["sha256"]), str(p["type"]), int(p["bytes"])) for p in data["pictures"])
        if not all(DIGEST_RE.match(p.sha256) for p in pictures):
            raise ValueError("a picture's name is not a SHA-256")
        ttl = data.get("ttl")
        return cls(str(data["uuid"]), float(data["kept_at"]), pictures, tuple(str(u) for u in data["source_urls"]),
                   None if ttl is None else float(ttl))


class PictureStoreUnavailable(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "The picture store cannot be read or written just now (a full disk, or an "
                              "unreachable bucket); retry shortly", type="server_error",
                         code="picture_store_unavailable", headers={"Retry-After": "5"})


@dataclass(frozen=True)
class Sources:
    """What the keeper fetches for a task: the provider's links, and its key's pictures_ttl."""

    urls: tuple[str, ...]
    ttl: float | None = None


class PictureGone(ApiError):
    def __init__(self, uuid: str, index: int) -> None:
        super().__init__(410, "Picture %d of task %s is no longer kept (pictures_ttl or pictures_max_bytes); "
                              "generate it again" % (index, uuid), param="index", code="picture_expired")


class Backend(abc.ABC):
    """Where the shelf's bytes live: a directory (pictures/directory.py) or an S3-compatible
    bucket (pictures/s3.py). Every method blocks: the keeper calls them on its own thread."""

    name = "directory"

    @abc.abstractmethod
    def put_object(self, digest: str, data: bytes, media_type: str) -> None:
        """Writes a picture whole or not at all (never half of one under its name)."""

    @abc.abstractmethod
    def refresh_object(self, digest: str, data: bytes) -> bool:
        """Marks a picture kept now, if it is there (False if not)."""

    @abc.abstractmethod
    def get_object(self, digest: str, limit: int) -> bytes | None:
        """At most `limit` bytes of a picture; None if it is not there."""

    @abc.abstractmethod
    def delete_object(self, digest: str) -> None:
        """Removes a picture (nothing if it is gone already)."""

    @abc.abstractmethod
    def list_objects(self) -> Iterator[tuple[str, int, float]]:
        """Every picture: (sha256, bytes, kept at)."""

    @abc.abstractmethod
    def put_manifest(self, uuid: str, data: bytes) -> None:
        """Writes a task's manifest whole or not at all."""

    @abc.abstractmethod
    def get_manifest(self, uuid: str) -> bytes | None:
        """A task's manifest; None if it has none."""

    @abc.abstractmethod
    def old_manifests(self, before: float) -> Iterator[str]:
        """The uuids of manifests written before `before`."""

    @abc.abstractmethod
    def delete_manifest(self, uuid: str) -> None:
        """Removes a task's manifest."""

    @abc.abstractmethod
    def mark_expiry(self, uuid: str, at: float) -> None:
        """Notes that a task's pictures go at `at`, before the store's age (its key's pictures_ttl)."""

    @abc.abstractmethod
    def due_expiries(self, now: float) -> Iterator[tuple[str, str]]:
        """(uuid, mark) of the tasks whose noted expiry has come."""

    @abc.abstractmethod
    def clear_expiry(self, mark: str) -> None:
        """Removes a mark once its task's pictures are gone."""

    def lock(self) -> ContextManager[Any]:
        """Held while writing and removing (processes sharing a directory take turns)."""
        return contextlib.nullcontext()

    def cleanup(self, now: float) -> None:  # noqa: B027 - an optional step: most backends have nothing to do
        """Removes what a crash left half-done, if the backend can leave any."""

    def close(self) -> None:  # noqa: B027 - likewise
        """Lets go of what it holds."""

    def describe(self) -> str:
        """Where the pictures are, for logs and the admin page (never a credential)."""
        return self.name


def open_backend(settings: Settings) -> Backend:
    """The backend the settings name: a bucket with pictures_s3_url, else a directory (a
    temporary one, removed at close, when the database keeps nothing either)."""
    try:
        if settings.pictures_s3_url:
            from zimage_tornado.pictures.s3 import Bucket
            return Bucket(settings.pictures_s3_url, settings.pictures_s3_endpoint, settings.pictures_s3_region)
        from zimage_tornado.pictures.directory import Directory
        path = settings.pictures_path
        return Directory(path or tempfile.mkdtemp(prefix="zimage-pictures-"), temporary=path is None)
    except Exception as e:  # noqa: BLE001 - a disk's or an S3 client's: said in one line at start
        where = settings.pictures_s3_url or settings.pictures_path or "a temporary directory"
        raise StoreNotOpened("the picture store %s cannot be opened: %s" % (where, e)) from e


class StoreNotOpened(ValueError):
    """The picture store cannot be used at start (a directory that cannot be made, a bucket that
    does not exist or cannot be reached, no credentials)."""


# A picture's stored time (a file's mtime, an object's Last-Modified) trails its task's kept_at by
# the write itself: within this, it is the same write (not another task keeping it again since).
SAME_WRITE_SECONDS = 60.0
KEPT_AT_ONCE = 4
MANIFESTS_CACHED = 10_000
MANIFEST_SECONDS = 3600.0  # another instance may remove a task's manifest (gc): forgotten within this
MANIFEST_LIMIT = 1024 * 1024  # a manifest names a batch's pictures: far less than this


class Shelf:
    """The pictures and what each task holds, over a backend: the budget and age are applied
    here, on an index of what is stored (rebuilt at start and every RESCAN_SECONDS, for what
    other processes or instances stored meanwhile)."""

    def __init__(self, backend: Backend, max_bytes: int, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._index: dict[str, tuple[int, float]] = {}  # sha256 -> (bytes, kept at)
        self._scanned = 0.0
        self.scan()

    def scan(self) -> None:
        self._index = {digest: (size, at) for digest, size, at in self.backend.list_objects()
                       if DIGEST_RE.match(digest)}
        self._scanned = self.clock()

    def put(self, uuid: str, pictures: list[tuple[bytes, str]], source_urls: tuple[str, ...],
            ttl: float | None = None) -> Manifest:
        """Keeps a task's pictures, then its manifest (a manifest never names a picture not yet
        stored); applies the budget and age after. `ttl`: its key's pictures_ttl, which can only
        shorten the store's (the store's is the operator's promise about the disk)."""
        now = self.clock()
        if ttl is not None and self.ttl and ttl >= self.ttl:
            ttl = None
        kept = []
        with self.backend.lock():
            for data, media_type in pictures:
                digest = hashlib.sha256(data).hexdigest()
                if not self.backend.refresh_object(digest, data):  # kept again: young again
                    self.backend.put_object(digest, data, media_type)
                self._index[digest] = (len(data), now)
                kept.append(Kept(digest, media_type, len(data)))
                self.counters["stored"] += 1
            manifest = Manifest(uuid, now, tuple(kept), source_urls, ttl)
            if ttl is not None:
                self.backend.mark_expiry(uuid.lower(), now + ttl)
            self.backend.put_manifest(uuid.lower(), json.dumps(manifest.as_dict()).encode())
            self._settle(now)
        return manifest

    def manifest(self, uuid: str) -> Manifest | None:
        data = self.backend.get_manifest(uuid.lower())
        if data is None:
            return None
        try:
            return Manifest.parse(json.loads(data))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("task %s: its picture manifest is unreadable (%s); fetching its pictures again", uuid, e)
            return None

    def read(self, manifest: Manifest, index: int) -> bytes:
        """A kept picture's bytes; PictureGone once it was removed (age or budget)."""
        picture = manifest.pictures[index]
        self.check_age(manifest, index)
        data = self.backend.get_object(picture.sha256, picture.size + 1)
        if data is None or len(data) != picture.size:  # gone, or not what was kept: never served as if it were
            raise PictureGone(manifest.uuid, index)
        return data

    def holds(self, digest: str) -> bool:
        """The picture is stored, as far as this process counts (another's removals: at its rescan)."""
        return digest in self._index

    def check_age(self, manifest: Manifest, index: int) -> None:
        """PictureGone once the task's pictures are past their age (its key's, or the store's)."""
        ttl = manifest.ttl or self.ttl
        if ttl and self.clock() - manifest.kept_at > ttl:
            raise PictureGone(manifest.uuid, index)

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
            self.backend.delete_object(digest)
            del self._index[digest]
            total -= size
            self.counters["expired" if old else "evicted"] += 1

    def gc(self) -> dict[str, Any]:
        """The budget and age applied now, and manifests of tasks past the age removed."""
        now = self.clock()
        with self.backend.lock():
            self.scan()
            self._settle(now)
            if self.ttl:
                for uuid in list(self.backend.old_manifests(now - self.ttl)):
                    self.backend.delete_manifest(uuid)
            for uuid, mark in list(self.backend.due_expiries(now)):
                self._expire(uuid)
                self.backend.clear_expiry(mark)
            self.backend.cleanup(now)
        return self.usage()

    def _expire(self, uuid: str) -> None:
        """A task whose key's pictures_ttl has passed: its pictures and manifest go (a picture kept
        again since, by another task, stays for that one)."""
        manifest = self.manifest(uuid)
        if manifest is not None:
            for picture in manifest.pictures:
                entry = self._index.get(picture.sha256)
                if entry is not None and entry[1] <= manifest.kept_at + SAME_WRITE_SECONDS:
                    self.backend.delete_object(picture.sha256)
                    del self._index[picture.sha256]
                    self.counters["expired"] += 1
        self.backend.delete_manifest(uuid)

    def usage(self) -> dict[str, Any]:
        oldest = min((kept_at for _, kept_at in self._index.values()), default=None)
        return {"bytes": sum(size for size, _ in self._index.values()), "pictures": len(self._index),
                "budget_bytes": self.max_bytes, "ttl_seconds": self.ttl, "oldest_kept_at": oldest,
                "stored": self.counters["stored"], "evicted": self.counters["evicted"],
                "expired": self.counters["expired"]}


def given(sources: Sources) -> Callable[[], Awaitable[Sources]]:
    """Sources already known, in the form the keeper asks for them (when their turn comes)."""
    async def known() -> Sources:
        return sources
    return known


async def resumed(record: Any, ttl_of: Callable[[str], float | None]) -> Sources:
    """A recorded task's sources: its links (at most its batch size) and its key's pictures_ttl."""
    return Sources(tuple(record.image_urls[:record.batch_size]), ttl_of(record.key))


class Keeper:
    """Fetches, checks and keeps a task's pictures once, and serves them."""

    def __init__(self, shelf: Shelf, *, fetch: Callable[[str], Awaitable[bytes]], conversions: Conversions,
                 max_side: int, cache_bytes: int) -> None:
        self.shelf = shelf
        self.fetch = fetch  # one URL's bytes, through the image fetcher's rules (public hosts, size limit)
        self.conversions = conversions
        self.max_side = max_side
        self.failed = 0
        self.cache = ByteBoundedCache(cache_bytes)  # pictures being served, shared by every client
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="picture-store")
        self._keeping: dict[str, asyncio.Future[Manifest]] = {}
        self._reading: dict[str, asyncio.Future[bytes]] = {}
        # manifests never change once written: a hot picture costs no disk or bucket read for its manifest
        self.manifests: ResultCache[Manifest, str] = ResultCache(MANIFESTS_CACHED, MANIFEST_SECONDS)
        self._background: set[asyncio.Future[Manifest]] = set()
        # Tasks whose pictures are being fetched and written at once: a burst of completions is
        # kept a few at a time, so that it never crowds out answers and webhooks on the IOLoop.
        self._turns = asyncio.Semaphore(KEPT_AT_ONCE)

    async def _io(self, call: Callable[..., Any], *args: Any) -> Any:
        """A shelf call on the store's thread. A disk or bucket that fails (full, unreachable,
        refusing) is a 503 the client can retry, never a 500: the provider's link may still live
        and the next read keeps the picture then."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError from a disk, any error of an S3 client
            log.warning("the picture store failed: %s: %s", type(e).__name__, e)
            raise PictureStoreUnavailable() from e

    def start(self, uuid: str, sources: Callable[[], Awaitable[Sources]]) -> None:
        """Keeps the task's pictures in the background (the engine just saw it complete); what to
        fetch is asked for when its turn comes."""
        future = self._join(uuid, sources)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _join(self, uuid: str, sources: Callable[[], Awaitable[Sources]]) -> asyncio.Future[Manifest]:
        pending = self._keeping.get(uuid)
        if pending is None:
            # a context of its own: the first request's id must not tag the fetch's log lines
            pending = asyncio.get_running_loop().create_task(self._keep(uuid, sources),
                                                             context=contextvars.Context())
            self._keeping[uuid] = pending
            pending.add_done_callback(lambda done: self._kept(uuid, done))
        return pending

    def _kept(self, uuid: str, done: asyncio.Future[Manifest]) -> None:
        self._keeping.pop(uuid, None)
        if not done.cancelled() and done.exception() is not None:
            self.failed += 1
            log.warning("task %s: its pictures could not be kept: %s", uuid, done.exception())

    async def _keep(self, uuid: str, sources: Callable[[], Awaitable[Sources]]) -> Manifest:
        async with self._turns:
            return await self._keep_now(uuid, await sources())

    async def _keep_now(self, uuid: str, sources: Sources) -> Manifest:
        existing = await self._io(self.shelf.manifest, uuid)
        if existing is not None:
            return existing
        urls = sources.urls
        if not urls:
            raise UpstreamBadResponse("Task %s completed without pictures" % uuid)
        fetched = await asyncio.gather(*(self.fetch(url) for url in urls))
        pictures = []
        for index, data in enumerate(fetched):
            try:
                pictures.append((data, await self.conversions.identify(data, self.max_side)))
            except NotAPicture as e:
                raise UpstreamBadResponse("Picture %d of task %s is not kept: %s" % (index, uuid, e)) from e
        manifest: Manifest = await self._io(self.shelf.put, uuid, pictures, urls, sources.ttl)
        log.info("task %s: %d pictures kept", uuid, len(pictures))
        return manifest

    async def manifest(self, uuid: str, sources: Callable[[], Awaitable[Sources]]) -> Manifest:
        """The task's kept pictures: kept now (joining a fetch in flight) if they are not yet,
        from what `sources` gives then."""
        manifest: Manifest | None = self.manifests.get(uuid)
        if manifest is not None:
            return manifest
        pending = self._keeping.get(uuid)
        if pending is None:
            manifest = await self._io(self.shelf.manifest, uuid)
        if manifest is None:
            if pending is None:
                found = await sources()  # before any fetch: a task that has no such picture is told so here
                pending = self._keeping.get(uuid) or self._join(uuid, given(found))
            manifest = await asyncio.shield(pending)
        self.manifests.put(uuid, manifest)
        return manifest

    async def read(self, manifest: Manifest, index: int) -> bytes:
        """A kept picture's bytes: from the cache, or one read from disk shared by every client
        asking meanwhile (sixty clients of a 15 MiB picture hold one copy, not sixty)."""
        digest = manifest.pictures[index].sha256
        self.shelf.check_age(manifest, index)  # a cached picture too: its age is the task's
        cached = self.cache.get(digest)
        if cached is not None:
            if not self.shelf.holds(digest):  # removed by the budget since: gone, as on disk
                raise PictureGone(manifest.uuid, index)
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

    async def resume(self, store: Store, now: float, ttl_of: Callable[[str], float | None]) -> int:
        """Completed tasks recorded within the age whose pictures are not kept (a crash between
        the completion and the fetch): kept now, in the background. Returns how many."""
        since = utc_day(now - self.shelf.ttl) if self.shelf.ttl else None
        records = await store.find_tasks(TaskQuery(status="completed", since=since, limit=RESUMED_AT_MOST))
        missing = [record for record in records
                   if record.image_urls and await self._io(self.shelf.manifest, record.uuid) is None]
        for record in missing:
            self.start(record.uuid, functools.partial(resumed, record, ttl_of))
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
        self.shelf.backend.close()
