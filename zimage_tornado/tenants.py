"""Who may use the gateway and how much: named API keys with their limits, and the caller of a
request as the rest of the gateway sees it (a name, a scope for its counters, a plan).

`api_keys_file` is either plain (one key a line) or TOML (a path ending in .toml), read with
Python's own tomllib. A plain key is named from its hash (`key-` and the first 8 hex digits of its
SHA-256), never from its line: idempotency keys, limits, quota, ownership and usage are scoped by
key name, so deleting a line must not hand one key's tasks to the next.

    [defaults]               # every key, unless it says otherwise; 0 or absent = unlimited
    requests_per_minute = 30
    images_per_day = 200
    max_waiters = 50
    reads_per_minute = 600   # absent: the reads_per_minute setting
    [keys.alice]
    key = "sk-alice-..."     # or key_sha256 = "<hex>", so that the file need not hold the secret
    images_per_day = 500
    webhook_url = "https://alice.example.com/hooks"   # tasks call back here unless they name another
    webhook_secret = "whsec_..."                       # signs alice's webhooks (else the setting's)
    pictures_ttl = 86400     # alice's kept pictures go after a day (at most the pictures_ttl setting)
    [keys.ops]
    key_sha256 = "..."
    admin = true
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from zimage_tornado.signing import parse_secrets

log = logging.getLogger("zimage_tornado.keys")

ANONYMOUS = "anonymous"
RESERVED_NAMES = frozenset({ANONYMOUS})  # names the gateway gives callers itself
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # key names become metric labels and log words
PLAN_FIELDS = ("requests_per_minute", "images_per_day", "max_waiters", "reads_per_minute")


@dataclass(frozen=True)
class Plan:
    """A caller's limits; 0 means unlimited."""

    requests_per_minute: int = 0
    images_per_day: int = 0
    max_waiters: int = 0
    reads_per_minute: int | None = None  # None: the server's reads_per_minute setting

    @property
    def meters_submits(self) -> bool:
        return bool(self.requests_per_minute or self.images_per_day)

    def reads_limit(self, default: int) -> int:
        return default if self.reads_per_minute is None else self.reads_per_minute


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str = field(repr=False)
    admin: bool = False
    plan: Plan = Plan()
    webhook_url: str | None = None  # the key's default webhook
    webhook_secrets: tuple[bytes, ...] = field(default=(), repr=False)  # its own; else the setting's
    pictures_ttl: float | None = None  # seconds its kept pictures are served; None: the setting's


@dataclass(frozen=True)
class Caller:
    name: str  # the key's name, or "anonymous": metrics labels and usage rows
    scope: str  # what limits, quotas and idempotency keys are counted against
    admin: bool = False
    plan: Plan = Plan()
    client: str = "-"  # the client address


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The configured keys. A bearer token is found by its SHA-256, compared in constant time."""

    def __init__(self, tenants: Iterable[Tenant] = (), configured: bool = False) -> None:
        self.tenants = tuple(tenants)
        # Keys settings given: the gateway is closed, even with no key in force (a file whose last
        # key was revoked, or that became empty or unreadable, admits nobody; it never opens).
        self.configured = configured or bool(self.tenants)
        self._by_digest = {tenant.key_sha256: tenant for tenant in self.tenants}
        names = [tenant.name for tenant in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("api keys: a key name is used twice")
        for name in names:
            if name in RESERVED_NAMES:
                raise ValueError("api keys: the key name %r is the gateway's own (callers without a key); "
                                 "choose another" % name)
        if len(self._by_digest) != len(self.tenants):
            raise ValueError("api keys: the same key is listed twice")

    def __bool__(self) -> bool:
        """Whether requests need a key."""
        return self.configured

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tenant.name for tenant in self.tenants)

    def find(self, name: str) -> Tenant | None:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        return None

    def identify(self, authorization: str) -> Tenant | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = digest(token.strip())
        for known, tenant in self._by_digest.items():  # every one compared: timing tells nothing
            if hmac.compare_digest(given, known):
                return tenant
        return None


def load_keys(api_keys: str, api_keys_file: str) -> KeyRing:
    """The keys of the `api_keys` setting and of `api_keys_file` (plain or TOML). Raises
    ValueError (or OSError) with a message naming what is wrong."""
    plain = [k.strip() for k in api_keys.split(",") if k.strip()]
    tenants: list[Tenant] = []
    if api_keys_file.endswith(".toml"):
        with open(api_keys_file, "rb") as f:
            try:
                document = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError("api_keys_file %s: %s" % (api_keys_file, e)) from None
        tenants += toml_tenants(document, api_keys_file)
    elif api_keys_file:
        with open(api_keys_file, encoding="utf-8") as f:
            plain += [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]
    tenants += [Tenant(plain_name(key), digest(key)) for key in plain]
    return KeyRing(tenants, configured=bool(api_keys.strip() or api_keys_file))


def plain_name(key: str) -> str:
    """A plain key's name: from its hash, so that it is the same whatever line the key is on."""
    return "key-" + digest(key)[:8]


def toml_tenants(document: dict[str, Any], where: str) -> list[Tenant]:
    defaults = plan_fields(document.get("defaults", {}), "%s [defaults]" % where)
    keys = document.get("keys", {})
    if not isinstance(keys, dict):
        raise ValueError("%s: [keys] must be a table of named keys" % where)
    tenants = []
    for name, entry in keys.items():
        context = "%s [keys.%s]" % (where, name)
        if name in RESERVED_NAMES:
            raise ValueError("%s: %r is the gateway's own name for callers without a key; choose another"
                             % (context, name))
        if not NAME_RE.fullmatch(name) or not isinstance(entry, dict):
            raise ValueError("%s: a key name is 1 to 64 of A-Z a-z 0-9 . _ -, and its entry a table" % context)
        unknown = set(entry) - {"key", "key_sha256", "admin", "webhook_url", "webhook_secret", "pictures_ttl",
                                *PLAN_FIELDS}
        if unknown:
            raise ValueError("%s: unknown field %s" % (context, sorted(unknown)[0]))
        if ("key" in entry) == ("key_sha256" in entry):
            raise ValueError("%s: give exactly one of key and key_sha256" % context)
        if "key" in entry:
            if not isinstance(entry["key"], str) or not entry["key"].strip():
                raise ValueError("%s: key must be a non-empty string" % context)
            key_sha256 = digest(entry["key"].strip())
        else:
            key_sha256 = str(entry["key_sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", key_sha256):
                raise ValueError("%s: key_sha256 must be 64 hex digits" % context)
        if not isinstance(entry.get("admin", False), bool):
            raise ValueError("%s: admin must be true or false" % context)
        plan = Plan(**{**defaults, **plan_fields(entry, context)})
        webhook_url = entry.get("webhook_url")
        if webhook_url is not None and not is_http_url(webhook_url):
            raise ValueError("%s: webhook_url must be an http:// or https:// URL" % context)
        secret = entry.get("webhook_secret", "")
        if not isinstance(secret, str):
            raise ValueError("%s: webhook_secret must be a string" % context)
        ttl = entry.get("pictures_ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0):
            raise ValueError("%s: pictures_ttl must be a number of seconds, more than 0" % context)
        tenants.append(Tenant(name, key_sha256, entry.get("admin", False), plan, webhook_url,
                              parse_secrets(secret, context), None if ttl is None else float(ttl)))
    return tenants


def is_http_url(value: Any, max_length: int = 2048) -> bool:
    """An absolute http(s) URL with a host, of printable characters without spaces."""
    if not isinstance(value, str) or not 0 < len(value) <= max_length or not value.isprintable() or " " in value:
        return False
    try:
        parts = urlsplit(value)
        _ = parts.port  # a port that does not parse raises ValueError
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def plan_fields(table: Any, context: str) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ValueError("%s must be a table" % context)
    fields = {}
    for name in PLAN_FIELDS:
        if name in table:
            value = table[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("%s: %s must be a whole number, 0 or more" % (context, name))
            fields[name] = value
    return fields


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is edited or replaced (an editor's or keys_cli's rename)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class LiveKeys:
    """The keys of `api_keys` and `api_keys_file`, read again on SIGHUP and when the file changes
    (the server checks every few seconds). A file that does not parse keeps the keys in force and
    logs why; a file that cannot be read (gone, unreadable) admits nobody but `api_keys` until it
    can, since the keys it held may be revoked ones. Requests in flight and waiters keep the caller
    they were given."""

    def __init__(self, api_keys: str, path: str) -> None:
        self.api_keys, self.path = api_keys, path
        self.on_removed: Callable[[frozenset[str]], None] = lambda names: None  # the gateway's: close their streams
        self.ring = load_keys(api_keys, path)  # at start, a bad file stops the server instead
        self._stamp = file_stamp(path) if path else None

    def check(self) -> None:
        if self.path and file_stamp(self.path) != self._stamp:
            self.reload("the file changed")

    def reload(self, why: str) -> bool:
        self._stamp = file_stamp(self.path) if self.path else None
        try:
            ring = load_keys(self.api_keys, self.path)
        except OSError as e:
            log.error("keys: %s, but it cannot be read; admitting no key of it until it can: %s", why, e)
            ring = load_keys(self.api_keys, "")
            ring.configured = True
            self._replace(ring)
            return False
        except ValueError as e:
            log.error("keys: %s, but it cannot be used; keeping the %d keys in force: %s", why, len(self.ring.tenants),
                      e)
            return False
        added = sorted(set(ring.names) - set(self.ring.names))
        removed = sorted(set(self.ring.names) - set(ring.names))
        self._replace(ring)
        log.info("keys: reloaded (%s): %d keys; added %s; removed %s", why, len(ring.tenants),
                 ", ".join(added) or "none", ", ".join(removed) or "none")
        return True

    def _replace(self, ring: KeyRing) -> None:
        removed = frozenset(self.ring.names) - frozenset(ring.names)
        self.ring = ring
        if removed:
            self.on_removed(removed)
