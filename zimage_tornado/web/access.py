"""Who is asking, and what they may do: request ids, CORS, API keys and the client's address
behind trusted reverse proxies. Pure functions over header values, so that handlers only decide
what to answer."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import os
import re
import uuid as uuidlib
from typing import Iterable, Mapping, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
CORS_EXPOSE_HEADERS = "X-Request-ID, x-should-retry, Retry-After"
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


def bearer_allowed(authorization: str, keys: Iterable[str]) -> bool:
    """True when `Authorization: Bearer <token>` names one of `keys`."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    # Compare with every key, in constant time, so that timing tells nothing about them.
    matched = [hmac.compare_digest(given, key.encode()) for key in keys]
    return scheme.lower() == "bearer" and any(matched)


def caller_scope(authorization: str, client_ip: str, keys_configured: bool) -> str:
    """A caller's scope: a hash of its API key when keys are configured (the key itself is never
    kept), else its client address."""
    if keys_configured:
        token = authorization.partition(" ")[2].strip()
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return "ip:" + client_ip


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

    remote = parsed(remote_ip or "")
    if remote is None or not trusted or not is_trusted(remote):
        return remote_ip or "-"
    forwarded = [parsed(a) for a in headers.get("X-Forwarded-For", "").split(",") if a.strip()]
    for ip in reversed(forwarded):  # the nearest hop first; skip our own proxies
        if ip is None:
            return str(remote)  # a hop that is not an address: believe none beyond it
        if not is_trusted(ip):
            return str(ip)
    real = parsed(headers.get("X-Real-IP", ""))
    return str(real or (forwarded[0] if forwarded else remote))
