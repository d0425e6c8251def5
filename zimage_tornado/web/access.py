"""Who is asking, and what they may do: request ids, CORS, API keys and the client's address
behind trusted reverse proxies. Pure functions over header values, so that handlers only decide
what to answer."""

from __future__ import annotations

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


def client_address(remote_ip: str | None, headers: Mapping[str, str], trusted: Sequence[Network]) -> str:
    """The client's IP: X-Forwarded-For / X-Real-IP are believed only from trusted proxies."""
    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    remote = remote_ip or "-"
    if not trusted or not is_trusted(remote):
        return remote
    forwarded = [a.strip() for a in headers.get("X-Forwarded-For", "").split(",") if a.strip()]
    for address in reversed(forwarded):  # the nearest hop first; skip our own proxies
        if not is_trusted(address):
            return address
    return headers.get("X-Real-IP", "").strip() or (forwarded[0] if forwarded else remote)
