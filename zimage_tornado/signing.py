"""Standard Webhooks signatures (https://www.standardwebhooks.com/, version 1): what a receiver
checks with the `standardwebhooks` or Svix libraries, unchanged.

A secret is `whsec_` and base64 of its bytes. The signed content is `{id}.{timestamp}.{body}`;
the signature header is `v1,` and base64 of its HMAC-SHA256, once per secret, space-separated,
so that a receiver still holding the old secret during a rotation verifies as well as one
holding the new.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16  # the specification asks for 24 to 64; fewer than 16 is a typo, not a secret
MAX_SECRET_BYTES = 64


def parse_secrets(text: str, where: str) -> tuple[bytes, ...]:
    """The secrets of a setting or a key's entry (space-separated during a rotation). Raises
    ValueError naming `where`, never the secret."""
    secrets = []
    for word in text.split():
        if not word.startswith(SECRET_PREFIX):
            raise ValueError("%s: a webhook secret starts with whsec_ (zimage-tornado keys secret makes one)" % where)
        try:
            secret = base64.b64decode(word[len(SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("%s: a webhook secret is whsec_ and base64" % where) from None
        if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
            raise ValueError("%s: a webhook secret holds %d to %d bytes" % (where, MIN_SECRET_BYTES, MAX_SECRET_BYTES))
        secrets.append(secret)
    return tuple(secrets)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def signature(secrets: tuple[bytes, ...], message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: one `v1,<base64>` per secret."""
    content = b"%s.%d.%s" % (message_id.encode("ascii"), timestamp, body)
    return " ".join("v1," + base64.b64encode(hmac.new(secret, content, hashlib.sha256).digest()).decode("ascii")
                    for secret in secrets)
