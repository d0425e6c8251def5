"""Webhook delivery: at least once, durable, one sender per message in a fleet.

A loop claims due messages from the store (each leased: its due time moves past the attempt's
timeout, so another instance does not take it meanwhile, and takes it over if this one dies),
POSTs each with the Standard Webhooks headers, and writes the outcome back:
- 2xx: delivered;
- 410 Gone: the URL is disabled for the message's key (its pending messages are not sent);
- another 4xx (but 408 and 429): given up, the receiver refused it;
- a timeout, a connection error, 3xx (redirects are not followed), 408, 429 or 5xx: retried on
  webhook_retry_delays (with jitter; a Retry-After of a 429 or 503 is honoured), until
  webhook_max_attempts;
- a URL that now resolves to a non-public address, or a message of a key since revoked: given up
  (the address is checked after DNS, on the address connected to);
- any other failure of an attempt (a receiver's header too large to read, ...): retried like a
  connection error, and counted toward webhook_max_attempts.
One key has at most a quarter of webhook_deliveries in flight, one receiver host an eighth: a
receiver that never answers holds its share, and another tenant's message is sent at once. A
message over its share is held here (leased) and started as soon as a slot of its key and host
frees; past what may be held, it goes back to the store, due a second later.
A message waiting for its retry is in the store: a restart, or another instance, sends it.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import random
import time
from collections import Counter
from typing import Callable
from urllib.parse import urlsplit

from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

from zimage_tornado import SERVICE_NAME, __version__
from zimage_tornado.images import NotPublic
from zimage_tornado.signing import signature
from zimage_tornado.store import DELIVERED, DISABLED, FAILED, PENDING, Store, StoreUnavailable, WebhookMessage
from zimage_tornado.webhooks import Webhooks

log = logging.getLogger("zimage_tornado.webhooks")

POLL_SECONDS = 1.0  # due messages are looked for this often, and at once when one is written here
BACKLOG_SECONDS = 5.0  # how often the backlog (for the metrics) is counted
LEASE_MARGIN = 15.0  # a claimed message is not taken by another instance for timeout + this
RESPONSE_BYTES = 1024 * 1024  # a receiver's answer is read and dropped; past this the attempt fails
MAX_RETRY_AFTER = 36000.0
JITTER = 0.1
RETRIED_4XX = frozenset({408, 429})
DEFER_SECONDS = 1.0  # a message over its share, and over what is held here, is due again in the store then
GIVE_UP_AT_MOST = 10_000  # pending messages of one revoked key given up at its reload (the rest at their turn)
HELD_PER_SLOT = 4  # messages over their share held here (leased), per delivery slot, to start as slots free
# Shares of webhook_deliveries one key, and one receiver host, may have in flight: a receiver that
# never answers holds its own share, not every slot (another tenant's message waits for none of them).
KEY_SHARE, HOST_SHARE = 4, 8


class Deliverer:
    def __init__(self, store: Store, webhooks: Webhooks, *, clock: Callable[[], float], timeout: float,
                 concurrency: int, max_attempts: int, delays: tuple[float, ...]) -> None:
        self.store = store
        self.webhooks = webhooks
        self.clock = clock
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.delays = delays
        self.lease = timeout + LEASE_MARGIN
        self.http = SimpleAsyncHTTPClient(
            force_instance=True, max_clients=concurrency, resolver=webhooks.resolver, max_body_size=RESPONSE_BYTES,
            defaults={"connect_timeout": min(timeout, 10.0), "request_timeout": timeout, "follow_redirects": False})
        self.outcomes: Counter[str] = Counter()  # delivered, retried, failed, disabled
        self.pending = 0  # the backlog as last counted (for the metrics)
        self.oldest_pending_age = 0.0
        self._in_flight: set[asyncio.Task[None]] = set()
        self.per_key, self.per_host = max(1, concurrency // KEY_SHARE), max(1, concurrency // HOST_SHARE)
        self._by_key: Counter[str] = Counter()  # attempts in flight, by key and by receiver host
        self._by_host: Counter[str] = Counter()
        self._held: list[tuple[float, WebhookMessage]] = []  # (start by, message): leased, over their share
        self._wake = asyncio.Event()
        self._soonest = float("inf")  # the earliest retry this instance scheduled: looked for then, not a poll later
        self._runner: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())

    def poke(self) -> None:
        """A message was written here: look for due ones now, not at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stops claiming; attempts in flight get a moment to end (one cut short is sent again
        when its lease ends, here after a restart or by another instance)."""
        self.closed = True
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=2.0)
            for attempt in self._in_flight:
                attempt.cancel()
        self.http.close()

    async def _run(self) -> None:
        next_count = 0.0
        while not self.closed:
            self._wake.clear()
            if self._soonest <= self.clock():
                self._soonest = float("inf")
            free = self.concurrency - len(self._in_flight)
            claimed: list[WebhookMessage] = []
            # claim in batches (a quarter of the slots at least), not a store round trip per freed slot
            if free >= max(1, self.concurrency // 4) or not self._in_flight:
                try:
                    claimed = await self.store.claim_webhooks(self.clock(), free, self.lease)
                except StoreUnavailable as e:
                    log.warning("webhooks: cannot read due messages (%s); trying again", e)
            start_by = self.clock() + self.lease - self.timeout - LEASE_MARGIN / 2  # an attempt ends in its lease
            self._held += [(start_by, message) for message in claimed]
            overflow = self._start_held()
            if overflow:
                await self._defer(overflow)
            if time.monotonic() >= next_count:
                next_count = time.monotonic() + BACKLOG_SECONDS
                await self._count_backlog()
            if claimed and len(claimed) == free:
                continue  # there may be more due
            try:
                await asyncio.wait_for(self._wake.wait(), min(POLL_SECONDS, max(0.0, self._soonest - self.clock())))
            except asyncio.TimeoutError:
                pass

    def _start_held(self) -> list[WebhookMessage]:
        """Starts the held messages whose key and host are under their share; drops those whose
        lease would end mid-attempt (the store hands them out again); returns those past what
        may be held, to be put back."""
        now, kept = self.clock(), []
        for start_by, message in self._held:
            key, host = message.key, host_of(message.url).lower()
            if start_by < now:
                continue
            if self._by_key[key] >= self.per_key or self._by_host[host] >= self.per_host or \
                    len(self._in_flight) >= self.concurrency:
                kept.append((start_by, message))
                continue
            self._by_key[key] += 1
            self._by_host[host] += 1
            attempt = asyncio.ensure_future(self._attempt(message))
            self._in_flight.add(attempt)
            attempt.add_done_callback(functools.partial(self._attempted, key, host))
        room = self.concurrency * HELD_PER_SLOT
        self._held = kept[:room]
        return [message for _, message in kept[room:]]

    async def _defer(self, messages: list[WebhookMessage]) -> None:
        """Back to the store, due again shortly, no attempt counted: their key or host is at its share."""
        due = self.clock() + DEFER_SECONDS
        self._soonest = min(self._soonest, due)
        for message in messages:
            message.next_at = due
        try:
            await asyncio.gather(*(self.store.webhook_attempted(message) for message in messages))
        except StoreUnavailable as e:  # kept and written later; the lease keeps others off meanwhile
            log.warning("webhooks: %d deferred messages are not written yet: %s", len(messages), e)

    def _attempted(self, key: str, host: str, attempt: asyncio.Task[None]) -> None:
        self._in_flight.discard(attempt)
        for counter, name in ((self._by_key, key), (self._by_host, host)):
            counter[name] -= 1
            if counter[name] <= 0:
                del counter[name]
        if self._held and not self.closed:
            overflow = self._start_held()  # a slot of this key or host is free: a held message takes it
            if overflow:
                asyncio.ensure_future(self._defer(overflow))
        if not attempt.cancelled() and attempt.exception() is not None:
            log.error("webhooks: an attempt failed unexpectedly", exc_info=attempt.exception())
        self._wake.set()  # a slot is free

    async def _count_backlog(self) -> None:
        try:
            self.pending, oldest = await self.store.webhook_backlog()
        except StoreUnavailable:
            return
        self.oldest_pending_age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)

    async def _attempt(self, message: WebhookMessage) -> None:
        now = self.clock()
        secrets = self.webhooks.secrets_for(message.key)
        if not self.webhooks.key_in_force(message.key):
            self._settle(message, FAILED, None, "not sent: the key was revoked")
        elif not secrets:
            self._settle(message, FAILED, None, "not sent: no webhook secret applies to this key any more")
        else:
            message.attempts += 1
            status, error, retry_after = await self._post(message, secrets, now)
            self._judge(message, status, error, retry_after)
            if message.status == DISABLED:
                await self._disable(message)
        try:
            await self.store.webhook_attempted(message)
        except StoreUnavailable as e:  # kept by the store and written later; the lease keeps others off meanwhile
            log.warning("webhooks: the outcome of %s is not written yet: %s", message.id, e)
        self.outcomes["retried" if message.status == PENDING else message.status] += 1
        log.info("webhook %s (%s of task %s, key %s) to %s: %s, attempt %d%s", message.id, message.type,
                 message.task, message.key, host_of(message.url), message.last_error or "delivered",
                 message.attempts, " (next in %.0f s)" % (message.next_at - self.clock())
                 if message.status == PENDING and message.next_at else "")

    async def give_up(self, keys: frozenset[str]) -> int:
        """Keys just revoked: their pending messages are given up now, recorded as such (never
        signed with a secret shared with other tenants, and not left waiting for their next try).
        Messages held here are settled when their turn comes, by the same rule."""
        held = {message.id for _, message in self._held}
        given_up = 0
        for key in sorted(keys):
            try:
                pending = await self.store.find_webhooks(key, PENDING, GIVE_UP_AT_MOST)
            except StoreUnavailable as e:
                log.warning("webhooks: the messages of a revoked key are given up at their turn instead: %s", e)
                return given_up
            for message in pending:
                if message.id in held:
                    continue
                self._settle(message, FAILED, None, "not sent: the key was revoked")
                try:
                    await self.store.webhook_attempted(message)
                except StoreUnavailable as e:
                    log.warning("webhooks: giving up %s is not written yet: %s", message.id, e)
                self.outcomes[FAILED] += 1
                given_up += 1
        if given_up:
            log.info("webhooks: %d pending messages of revoked keys given up", given_up)
        return given_up

    async def _disable(self, message: WebhookMessage) -> None:
        self.webhooks.disabled(message.key, message.url)
        try:
            await self.store.disable_url(message.key, message.url, self.clock())
        except StoreUnavailable as e:
            log.warning("webhooks: disabling %s for %s is not written yet: %s", host_of(message.url), message.key, e)

    async def _post(self, message: WebhookMessage, secrets: tuple[bytes, ...],
                    now: float) -> tuple[int | None, str | None, float | None]:
        """(HTTP status, the failure in the gateway's words, Retry-After seconds) of one attempt."""
        body = message.body.encode("utf-8")
        timestamp = int(now)
        request = HTTPRequest(message.url, method="POST", body=body, headers={
            "Content-Type": "application/json", "User-Agent": "%s/%s (webhooks)" % (SERVICE_NAME, __version__),
            "webhook-id": message.id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secrets, message.id, timestamp, body)},
            streaming_callback=lambda chunk: None)  # the answer is read and dropped
        try:
            response: HTTPResponse = await self.http.fetch(request, raise_error=False)
        except NotPublic:
            return None, "not sent: the URL now resolves to a non-public address", None
        except HTTPTimeoutError:
            return None, "timed out after %g s" % self.timeout, None
        except HTTPClientError as e:
            return None, "failed: HTTP client error %d" % e.code, None
        except (OSError, ValueError) as e:  # refused, reset, TLS, DNS
            return None, "could not connect: %s" % type(e).__name__, None
        except Exception as e:  # noqa: BLE001 - a receiver's answer the client cannot take (a header over
            # 64 KiB: UnsatisfiableReadError, ...) is a failed attempt like any other: counted, never a loop
            return None, "failed: %s" % type(e).__name__, None
        if 200 <= response.code < 300:
            return response.code, None, None
        if response.code == 599:  # the client's own failure, as a response
            return None, "failed: %s" % type(response.error).__name__, None
        return response.code, "HTTP %d" % response.code, retry_after(response.headers.get("Retry-After"))

    def _judge(self, message: WebhookMessage, status: int | None, error: str | None,
               retry_after_seconds: float | None) -> None:
        now = self.clock()
        message.last_status, message.last_error = status, error
        if error is None:
            message.status, message.delivered_at, message.next_at = DELIVERED, now, None
        elif status == 410:
            message.status, message.next_at = DISABLED, None
            message.last_error = "HTTP 410 Gone: the URL is disabled for this key"
        elif error.startswith("not sent") or (status is not None and 400 <= status < 500 and
                                              status not in RETRIED_4XX):
            message.status, message.next_at = FAILED, None
        elif message.attempts >= self.max_attempts:
            message.status, message.next_at = FAILED, None
            message.last_error = "%s; gave up after %d attempts" % (error, message.attempts)
        else:
            message.status, message.next_at = PENDING, now + self.delay(message.attempts, retry_after_seconds)
            self._soonest = min(self._soonest, message.next_at)

    def _settle(self, message: WebhookMessage, status: str, http_status: int | None, error: str) -> None:
        message.status, message.last_status, message.last_error, message.next_at = status, http_status, error, None

    def delay(self, attempts: int, retry_after_seconds: float | None = None) -> float:
        """Seconds before the next attempt, after `attempts` failed ones."""
        if retry_after_seconds is not None:
            return retry_after_seconds
        base = self.delays[min(attempts, len(self.delays)) - 1]
        return base * random.uniform(1 - JITTER, 1 + JITTER)


def retry_after(value: str | None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date), within [0, MAX_RETRY_AFTER]."""
    if not value:
        return None
    value = value.strip()[:64]
    try:
        if value.isdigit():
            seconds = float(value)
        else:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def host_of(url: str) -> str:
    """What a log line says of a URL: its host (a query string may carry the receiver's token)."""
    return urlsplit(url).netloc.rpartition("@")[2][:200]
