"""Result images fetched by the gateway itself, for `response_format: b64_json` answers.

Whoever controls a task's result URLs (a hostile or broken upstream) would otherwise steer the
gateway's downloads, so:
- a download connects only to public addresses (checked on the address actually connected to,
  after DNS, on every redirect hop), except the upstream's own origin and `image_hosts`;
- it reads at most `max_image_bytes` (Content-Length first, then while reading), fetches no
  more URLs than the task's batch size, and its siblings stop counting once one fails;
- images have their own connection pool, so slow images cannot starve submits and status reads;
- concurrent and repeated b64 answers for one task share one download, kept in a small
  byte-bounded cache.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import ipaddress
import socket
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Hashable, Iterator
from urllib.parse import urlsplit

from tornado.netutil import DefaultLoopResolver, Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from zimage_tornado.domain import Task
from zimage_tornado.errors import ApiError
from zimage_tornado.upstream import UpstreamBadResponse, UpstreamError, ZImageClient

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class NotPublic(OSError):
    """An image host that resolves only to addresses the gateway must not fetch from."""


# IPv6 forms that carry an IPv4 address in their last 32 bits: the IPv4 address is what a
# translator (NAT64 on the way, a host's own stack for the others) ends up reaching.
EMBEDDING_IPV4 = tuple(ipaddress.IPv6Network(net) for net in (
    "64:ff9b::/96",  # NAT64, well-known prefix (RFC 6052): 64:ff9b::a00:1 is 10.0.0.1
    "::ffff:0:0/96",  # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765)
    "::/96",  # IPv4-compatible (deprecated, still routed by some stacks)
))
# Refused whole: local-use NAT64 (RFC 8215: the IPv4 address sits where the operator chose) and
# site-local (deprecated, but routed inside some networks).
NEVER = tuple(ipaddress.IPv6Network(net) for net in ("64:ff9b:1::/48", "fec0::/10"))


def is_public(ip: Address) -> bool:
    """Not loopback, private, link-local, unique-local, multicast, unspecified or reserved, and,
    for an IPv6 address that carries an IPv4 one (NAT64, 6to4, Teredo, mapped, translated,
    compatible), neither is the IPv4 address inside."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in NEVER):
            return False
        inside: list[ipaddress.IPv4Address] = []
        if any(ip in net for net in EMBEDDING_IPV4):
            inside.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            inside.append(ip.sixtofour)
        if ip.teredo is not None:
            inside.extend(ip.teredo)  # (server, client): the client's address is unobfuscated already
        if inside:
            return all(is_public(address) for address in inside) and (ip.is_global or ip.teredo is not None)
    return ip.is_global and not ip.is_multicast


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class PublicOnlyResolver(Resolver):
    """Resolves like the default resolver, then keeps only public addresses, unless the host and
    port belong to an allowed origin. The HTTP client connects to what this returns, so a name
    that resolves to 10.0.0.1 (or re-resolves to it later: DNS rebinding) is never connected to."""

    def initialize(self, allowed: frozenset[tuple[str, int]] = frozenset(),
                   allowed_hosts: frozenset[str] = frozenset()) -> None:
        self.allowed = allowed  # (host, port) pairs
        self.allowed_hosts = allowed_hosts  # hosts, on any port
        self.inner = DefaultLoopResolver()

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        addresses = await self.inner.resolve(host, port, family)
        name = host.lower().strip("[]")
        if (name, port) in self.allowed or name in self.allowed_hosts:
            return addresses
        public = [(fam, address) for fam, address in addresses if is_public(ipaddress.ip_address(address[0]))]
        if not public:
            raise NotPublic("%s resolves to a loopback, private or otherwise non-public address" % host[:100])
        return public


# The client's own body limit sits above max_image_bytes: the download's callbacks stop it exactly
# (upstream.py), with a message that says why; this only stops a host whose one chunk jumps past both.
BACKSTOP_BYTES = 16 * 2 ** 20


def make_image_client(*, upstream_url: str, image_hosts: tuple[str, ...], max_clients: int, max_bytes: int,
                      connect_timeout: float, request_timeout: float, ca_certs: str | None) -> SimpleAsyncHTTPClient:
    """The image downloads' own client and pool (never the upstream's)."""
    allowed = frozenset(origin(url)[1:] for url in (upstream_url, *image_hosts))
    defaults: dict[str, Any] = {"connect_timeout": connect_timeout, "request_timeout": request_timeout,
                                "follow_redirects": True, "max_redirects": 3}
    if ca_certs:
        defaults["ca_certs"] = ca_certs
    return SimpleAsyncHTTPClient(force_instance=True, max_clients=max_clients, defaults=defaults,
                                 resolver=PublicOnlyResolver(allowed=allowed),
                                 max_body_size=max_bytes + BACKSTOP_BYTES)


FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(images: list[bytes]) -> list[str]:
    return [base64.b64encode(image).decode("ascii") for image in images]


# output_compression folds into these levels (the smallest at or above the value asked): every
# value would otherwise be a conversion and a cache entry of its own (101 x 2 formats x each picture).
QUALITY_LEVELS = (25, 50, 75, 90, 100)
SIDE_MARGIN = 1.125  # a picture may be this much larger than max_size on a side: providers round up
DECODED = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}  # what a picture may be


class NotAPicture(ValueError):
    """Bytes that are not a PNG, JPEG or WebP picture of a size a model here makes."""


def quality_level(compression: int | None) -> int | None:
    """The encoder quality actually used for `compression` (OpenAI's output_compression, 0-100)."""
    if compression is None:
        return None
    return next(level for level in QUALITY_LEVELS if level >= compression)


@contextlib.contextmanager
def opened_picture(image: bytes, max_side: int) -> Iterator[Any]:
    """The picture opened by Pillow, its declared size checked before anything is decoded (a
    small file may declare 13000 x 13000, below Pillow's own bomb guard, which decodes to
    gigabytes). Any decoder failure is NotAPicture: the bytes are not what they claim."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image), formats=tuple(DECODED)) as opened:
            width, height = opened.size
            if max(width, height) > max_side:
                raise NotAPicture("it declares %dx%d, larger than any model here makes (%d a side)"
                                  % (width, height, max_side))
            yield opened
    except NotAPicture:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure
        raise NotAPicture("it is not a readable PNG, JPEG or WebP picture") from e


def prepare(image: bytes, fmt: str, level: int | None, max_side: int) -> bytes:
    """The picture as `fmt`, checked: run in the conversion pool (Pillow is CPU work). A picture
    already in `fmt` is verified (every chunk read, nothing kept) and served as it came; another
    is decoded and encoded once, at the quality `level`."""
    with opened_picture(image, max_side) as opened:
        if opened.format == fmt.upper():
            opened.verify()  # a truncated or corrupt file is refused, not passed on
            return image
        opened.load()
        picture = opened.convert("RGB") if fmt == "jpeg" and opened.mode not in ("RGB", "L") else opened  # no alpha
        out = io.BytesIO()
        picture.save(out, format=fmt.upper(), **({"quality": level} if level is not None else {}))
        return out.getvalue()


def identify(image: bytes, max_side: int) -> str:
    """The media type of a picture kept as it came, verified like prepare()'s."""
    with opened_picture(image, max_side) as opened:
        kind = DECODED[str(opened.format)]
        opened.verify()
        return kind


class Conversions:
    """Pillow's work on its own few threads, so that pictures never take the default executor
    (the store and base64 use it) and at most `workers` decoded pictures are in memory at once;
    past `waiting` queued conversions a request is refused at once rather than held."""

    def __init__(self, workers: int = 2, waiting: int = 16) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pictures")
        self._room = waiting + workers
        self.busy = 0

    async def run(self, image: bytes, fmt: str, level: int | None, max_side: int) -> bytes:
        if self.busy >= self._room:
            raise ApiError(503, "Too many pictures are being converted at once; retry shortly", type="server_error",
                           code="conversions_busy", headers={"Retry-After": "1"})
        self.busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, prepare, image, fmt, level, max_side)
        finally:
            self.busy -= 1

    async def identify(self, image: bytes, max_side: int) -> str:
        """identify() in the pool: the picture store's check before it keeps a picture (it waits
        its turn rather than being refused: nobody is waiting on the other end)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, identify, image, max_side)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ByteBoundedCache:
    """Pictures (raw, or a task's base64 answers), least recently used first out, at most
    `max_bytes` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Hashable, tuple[int, Any]] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Hashable, value: bytes | list[str]) -> None:
        size = len(value) if isinstance(value, bytes) else sum(len(item) for item in value)
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (size, value)
        self.size += size
        while self.size > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self.size -= evicted


class ImageFetcher:
    def __init__(self, upstream: ZImageClient, *, max_bytes: int, cache_bytes: int, at_once: int,
                 max_side: int, conversions: Conversions | None = None) -> None:
        self.upstream = upstream
        self.max_bytes = max_bytes
        self.max_side = max_side  # the largest side a picture may declare (max_size and a margin)
        self.cache = ByteBoundedCache(cache_bytes)
        self.conversions = conversions or Conversions()
        self._pending: dict[str, asyncio.Future[list[str]]] = {}
        self._pictures: dict[tuple[Any, ...], asyncio.Future[bytes]] = {}
        self._slots = asyncio.Semaphore(at_once)  # downloads in flight, over all tasks
        # pictures=keep: a task's picture comes from the picture store (which fetched it once)
        self.kept: Callable[[Task, int], Awaitable[bytes]] | None = None

    async def b64(self, task: Task, batch_size: int, fmt: str = "png", compression: int | None = None) -> list[str]:
        """The task's first `batch_size` images, base64-encoded, in order (converted to `fmt`)."""
        if fmt != "png" or self.kept is not None:
            pictures = await asyncio.gather(*(self.picture(task, i, fmt, compression)
                                              for i in range(min(batch_size, len(task.image_urls)))))
            return await asyncio.get_running_loop().run_in_executor(None, encode, [p for p, _ in pictures])
        cached = self.cache.get(task.uuid)
        if cached is not None:
            return cached
        pending = self._pending.get(task.uuid)
        if pending is None:
            pending = asyncio.ensure_future(self._download(task.uuid, task.image_urls[:batch_size]))
            self._pending[task.uuid] = pending
            pending.add_done_callback(lambda done: self._downloaded(task.uuid, done))
        # shield: one client leaving must not cancel the download the others wait for
        return await asyncio.shield(pending)

    def _downloaded(self, uuid: str, done: asyncio.Future[list[str]]) -> None:
        self._pending.pop(uuid, None)
        if not done.cancelled() and done.exception() is None:
            self.cache.put(uuid, done.result())

    async def _download(self, uuid: str, urls: tuple[str, ...]) -> list[str]:
        if not urls:
            raise UpstreamBadResponse("The task has no image URLs to fetch")
        aborted = asyncio.Event()
        fetches = [asyncio.ensure_future(self._one(url, aborted)) for url in urls]
        try:
            images = await asyncio.gather(*fetches)
        except BaseException:
            aborted.set()  # the others stop keeping what they read, and are cancelled
            for fetch in fetches:
                fetch.cancel()
            await asyncio.gather(*fetches, return_exceptions=True)
            raise
        checked = [await self._prepared(uuid, index, image, "png", None) for index, image in enumerate(images)]
        return await asyncio.get_running_loop().run_in_executor(None, encode, checked)  # big pictures: off the loop

    async def picture(self, task: Task, index: int, fmt: str = "png",
                      compression: int | None = None) -> tuple[bytes, str]:
        """One of the task's pictures and its media type, fetched under the same rules, once
        however many clients ask at the same time (they join the download in flight) and kept in
        the byte-bounded cache: every client is then written from the same bytes. It is checked
        (or converted to `fmt`, at the quality level of `compression`) once per picture, format
        and level, in the conversion pool."""
        kept = self.kept
        image = await self._once(("picture", task.uuid, index),
                                 lambda: kept(task, index) if kept else self.fetch(task.image_urls[index]))
        level = quality_level(compression)
        return await self._once(("ready", task.uuid, index, fmt, level),
                                lambda: self._prepared(task.uuid, index, image, fmt, level)), FORMATS[fmt]

    async def _prepared(self, uuid: str, index: int, image: bytes, fmt: str, level: int | None) -> bytes:
        try:
            return await self.conversions.run(image, fmt, level, self.max_side)
        except NotAPicture as e:
            raise UpstreamBadResponse("Picture %d of task %s could not be converted to %s: %s" % (
                index, uuid, fmt, e)) from e

    async def _once(self, key: tuple[Any, ...], make: Callable[[], Awaitable[bytes]]) -> bytes:
        """`make()`'s bytes for `key`: from the cache, or one computation shared by every caller."""
        cached = self.cache.get(key)
        if cached is not None:
            return bytes(cached)
        pending = self._pictures.get(key)
        if pending is None:
            pending = asyncio.ensure_future(make())
            self._pictures[key] = pending
            pending.add_done_callback(lambda done: self._fetched(key, done))
        # shield: one client leaving must not cancel the work the others wait for
        return await asyncio.shield(pending)

    def _fetched(self, key: tuple[Any, ...], done: asyncio.Future[bytes]) -> None:
        self._pictures.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            self.cache.put(key, done.result())

    async def fetch(self, url: str) -> bytes:
        """One picture's bytes from its source, under the rules above."""
        return await self._one(url, asyncio.Event())

    async def _one(self, url: str, aborted: asyncio.Event) -> bytes:
        async with self._slots:
            try:
                return await self.upstream.fetch_image(url, self.max_bytes, aborted.is_set)
            except UpstreamError as e:
                if isinstance(e.__cause__, NotPublic):
                    raise UpstreamBadResponse("Refused to fetch an image: %s (allowed: the upstream's "
                                              "origin and image_hosts)" % e.__cause__) from e
                raise
