"""Who is asking, and what they may do: request ids, CORS, API keys and the client's address
behind trusted reverse proxies. Pure functions over header values, so that handlers only decide
what to answer."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import re
import uuid as uuidlib
from typing import Mapping, Sequence

from zimage_tornado.store import Admission
from zimage_tornado.tenants import ANONYMOUS, Caller, KeyRing, Plan

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
CORS_EXPOSE_HEADERS = ("X-Request-ID, x-should-retry, Retry-After, x-ratelimit-limit-requests, "
                       "x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-images, "
                       "x-ratelimit-remaining-images, x-ratelimit-reset-images, x-ratelimit-limit-reads, "
                       "x-ratelimit-remaining-reads, x-ratelimit-reset-reads")
_request_ids = {"prefix": uuidlib.uuid4().hex[:16], "counter": itertools.count()}


def _new_request_id_prefix() -> None:
    _request_ids["prefix"] = uuidlib.uuid4().hex[:16]


os.register_at_fork(after_in_child=_new_request_id_prefix)  # --processes workers must not share ids


def request_id(given: str) -> str:
    """The client's X-Request-ID when it is safe to echo and log, else a new one: unique, not
    secret, so a random per-process prefix and a counter (no syscall)."""
    if REQUEST_ID_RE.fullmatch(given):
        return given
    return "%s%016x" % (_request_ids["prefix"], next(_request_ids["counter"]))  # type: ignore[call-overload]


def cors_headers(origin: str | None, allowed: frozenset[str]) -> dict[str, str]:
    """The CORS answer headers for a browser `Origin`, when that origin is allowed."""
    if not origin or not ("*" in allowed or origin in allowed):
        return {}
    return {"Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
            "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS, "Vary": "Origin"}


def caller(keys: KeyRing, authorization: str, client: str, anonymous: Plan,
           prefixes: tuple[int, int] = (32, 128)) -> Caller | None:
    """The caller of a request: the key's tenant when keys are configured (None for a missing or
    unknown key), else an anonymous caller counted by its network (`prefixes`: IPv4's, IPv6's)."""
    if not keys:
        return Caller(ANONYMOUS, "ip:" + network_of(client, prefixes), False, anonymous, client)
    tenant = keys.identify(authorization)
    if tenant is None:
        return None
    return Caller(tenant.name, "key:" + tenant.name, tenant.admin, tenant.plan, client)


@functools.lru_cache(maxsize=4096)
def network_of(address: str, prefixes: tuple[int, int]) -> str:
    """The network a client's limits count against: one host rotating addresses inside its IPv6
    /64 is one client. An address that does not parse is counted as itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    prefix = prefixes[0] if ip.version == 4 else prefixes[1]
    if prefix >= ip.max_prefixlen:
        return address
    return str(ipaddress.ip_network("%s/%d" % (ip, prefix), strict=False))


def rate_limit_headers(admission: Admission | None, kinds: tuple[str, str] = ("requests", "images")) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits that apply (submits: requests and images;
    task reads: reads)."""
    headers: dict[str, str] = {}
    if admission is None:
        return headers
    for kind, window in ((kinds[0], admission.requests), (kinds[1], admission.images)):
        if window is not None:
            headers["x-ratelimit-limit-%s" % kind] = str(window.limit)
            headers["x-ratelimit-remaining-%s" % kind] = str(window.remaining)
            headers["x-ratelimit-reset-%s" % kind] = duration(window.reset)
    return headers


def duration(seconds: float) -> str:
    """As OpenAI writes it: 20ms, 1.5s, 6m0s, 13h2m5s."""
    if seconds < 1:
        return "%dms" % max(0, round(seconds * 1000))
    if seconds < 60:
        return "%gs" % round(seconds, 1)
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return ("%dh" % hours if hours else "") + "%dm%ds" % divmod(rest, 60)


def from_trusted_proxy(remote_ip: str | None, trusted: Sequence[Network]) -> bool:
    """The connection comes from one of trusted_proxies (whose X-Forwarded-* headers are believed)."""
    if not trusted:
        return False
    try:
        remote = ipaddress.ip_address((remote_ip or "").strip())
    except ValueError:
        return False
    return any(remote in network for network in trusted)


def client_address(remote_ip: str | None, headers: Mapping[str, str], trusted: Sequence[Network]) -> str:
    """The client's IP: X-Forwarded-For / X-Real-IP are believed only from trusted proxies, and
    only where they are IP addresses (anything else would reach logs and limits as given)."""
    def parsed(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(address.strip())
        except ValueError:
            return None

    def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in network for network in trusted)

    if not trusted:  # the usual case, with no address to parse (ipaddress is one of the costlier steps of a submit)
        return remote_ip or "-"
    remote = parsed(remote_ip or "")
    if remote is None or not is_trusted(remote):
        return remote_ip or "-"
    forwarded = [parsed(a) for a in headers.get("X-Forwarded-For", "").split(",") if a.strip()]
    for ip in reversed(forwarded):  # the nearest hop first; skip our own proxies
        if ip is None:
            return str(remote)  # a hop that is not an address: believe none beyond it
        if not is_trusted(ip):
            return str(ip)
    real = parsed(headers.get("X-Real-IP", ""))
    return str(real or (forwarded[0] if forwarded else remote))
