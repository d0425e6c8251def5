"""The gateway's own links to kept pictures: `{base}/v1/images/{uuid}/{index}?expires=&signature=`.

A signed link loads with no Authorization header (a browser's <img>, a chat front-end, a
webhook receiver): the signature is an HMAC-SHA256, under the link secret, of the path and the
expiry. Expiries are rounded up to the hour, so that every answer within an hour gives the same
URL and browsers and proxies cache one picture once. The secret is the link_secret setting, or
one generated once and kept in the store, so that every process and instance agrees.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import secrets
from typing import Callable
from urllib.parse import urlencode

from zimage_tornado.errors import ApiError
from zimage_tornado.store import Store

ROUNDING = 3600.0
# A Host a client sent: a name or an address and a port, nothing that could end a URL or a header.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
SIGNATURE_LENGTH = 43  # a SHA-256 HMAC in unpadded base64url
# (uuid, pictures the provider listed, pictures the task asked for) -> its links: Links.pictures at a base
LinkMaker = Callable[[str, int, int], tuple[str, ...]]


class Links:
    def __init__(self, store: Store, *, secret: str, ttl: float, public_url: str, clock: Callable[[], float]) -> None:
        self.store = store
        self.ttl = ttl
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self._configured = secret
        self._key: bytes | None = secret.encode() if secret else None
        self._loading: asyncio.Future[bytes] | None = None

    async def ready(self) -> None:
        """Loads (or makes, first in the store) the link secret; at once when known."""
        if self._key is not None:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        try:
            self._key = await asyncio.shield(self._loading)
        except Exception:
            self._loading = None  # the store was away: the next request tries again
            raise

    async def _load(self) -> bytes:
        return (await self.store.secret("link", secrets.token_urlsafe(32))).encode()

    def base(self, scheme: str, host: str) -> str:
        """public_url, else the request's own origin (`host` as the client sent it: checked)."""
        if self.public_url:
            return self.public_url
        if not HOST_RE.match(host):
            raise ApiError(400, "The Host header is not a host name or address; set public_url to give links",
                           code="invalid_host")
        return "%s://%s" % ("https" if scheme == "https" else "http", host)

    def expiry(self) -> int:
        return int(math.ceil((self.clock() + self.ttl) / ROUNDING) * ROUNDING)

    def sign(self, path: str, expires: int) -> str:
        assert self._key is not None, "await ready() first"
        digest = hmac.new(self._key, ("%s\n%d" % (path, expires)).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def picture(self, base: str, uuid: str, index: int, fmt: str | None = None,
                compression: int | None = None) -> str:
        path = "/v1/images/%s/%d" % (uuid, index)
        expires = self.expiry()
        query: dict[str, str | int] = {"expires": expires, "signature": self.sign(path, expires)}
        if fmt is not None:
            query["format"] = fmt
        if compression is not None:
            query["compression"] = compression
        return base + path + "?" + urlencode(query)

    def pictures(self, base: str, uuid: str, listed: int, asked: int, fmt: str | None = None,
                 compression: int | None = None) -> tuple[str, ...]:
        """Links to a task's pictures: as many as the provider listed, and never more than the task
        asked for (a hostile upstream may list hundreds; no more are kept)."""
        return tuple(self.picture(base, uuid, index, fmt, compression) for index in range(min(listed, asked)))

    def check(self, path: str, expires: str, signature: str) -> int:
        """Seconds the link has left; a 403 when it is forged, altered or expired."""
        if not expires.isdigit() or len(expires) > 12 or len(signature) != SIGNATURE_LENGTH:
            raise ApiError(403, "This picture link is not valid", code="invalid_signature")
        if not hmac.compare_digest(self.sign(path, int(expires)), signature):
            raise ApiError(403, "This picture link is not valid", code="invalid_signature")
        left = int(expires) - int(self.clock())
        if left <= 0:
            raise ApiError(403, "This picture link has expired; ask for the task again for a new one",
                           code="link_expired")
        return left
