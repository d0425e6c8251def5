"""Who is asking: API keys and the client's address behind trusted reverse proxies. Pure
functions over header values, so that handlers only decide what to answer."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Iterable, Mapping, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
