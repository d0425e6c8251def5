"""Webhooks: a task calls back when it ends (and, if asked, as it progresses).

A submit names a `webhook` URL and the `webhook_events` it wants (or its key has a default
`webhook_url`); the subscription is checked before anything reaches the upstream (a secret must
apply, the URL must be public or in `webhook_hosts`, not disabled by a 410) and recorded with the
task. When the task ends, its message is written by the same store write that records the end
(store.Notice): the outbox cannot lose a message that the record says was due. Progress
messages are written as the engine reads a new status or progress, at most once per poll
interval. delivery.py sends them.

The body is `{"type", "timestamp", "data"}`; `data` is the task as GET /v1/tasks/{uuid} shows
it (the upstream's answer, image URLs included), or, for task.expired, the gateway's own word in
the same shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable

from tornado.netutil import Resolver

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import COMPLETED, FAILED, Task
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.images import NotPublic, PublicOnlyResolver, origin
from zimage_tornado.store import EXPIRED, Notice, Store, StoreUnavailable, WebhookMessage
from zimage_tornado.tenants import Caller, KeyRing, is_http_url

log = logging.getLogger("zimage_tornado.webhooks")

PROGRESS = "task.progress"
EVENTS = ("task.completed", "task.failed", "task.expired", PROGRESS)
DEFAULT_EVENTS = EVENTS[:3]
FINAL_EVENTS = {COMPLETED: "task.completed", FAILED: "task.failed", EXPIRED: "task.expired"}
MAX_URL_LENGTH = 2048
CHECKED_SECONDS = 60.0  # a URL found public is not resolved again for this long (at delivery it always is)
# A (key, URL) found enabled is not asked of the store again for this long: a 410 seen by another
# instance of a fleet reaches this one's submits this late at most (its messages are settled as
# disabled at delivery whatever the submit was told).
ENABLED_SECONDS = 5.0
SUBSCRIPTIONS_CACHED = 10_000


@dataclass(frozen=True)
class WebhookRequest:
    """What a submit's body asked for: a URL (None: the key's default) and events (None: default)."""

    url: str | None
    events: tuple[str, ...] | None


@dataclass(frozen=True)
class Subscription:
    url: str
    events: tuple[str, ...]


def requested(params: dict[str, Any]) -> WebhookRequest | None:
    """`webhook` and `webhook_events` of a submit's body (or extra_body), checked for shape."""
    url, events = params.get("webhook"), params.get("webhook_events")
    if url is None and events is None:
        return None
    if url is not None and not is_http_url(url, MAX_URL_LENGTH):
        raise invalid("webhook must be an http:// or https:// URL of at most %d characters" % MAX_URL_LENGTH,
                      param="webhook", code="invalid_webhook_url")
    if events is not None:
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            raise invalid("webhook_events must be a non-empty array of event types", param="webhook_events",
                          code="invalid_type")
        unknown = [e for e in events if e not in EVENTS]
        if unknown:
            raise invalid("webhook_events: unknown event %r; expected some of %s"
                          % (unknown[0][:60], ", ".join(EVENTS)), param="webhook_events")
        events = tuple(e for e in EVENTS if e in events)  # known order, each once
    return WebhookRequest(url, events)


def body(event: str, at: float, data: Any, image_urls: tuple[str, ...] | None = None) -> str:
    """A message's JSON, as sent and signed; `image_urls`: the gateway's own links to the pictures."""
    message: dict[str, Any] = {"type": event, "timestamp": iso_time(at), "data": data}
    if image_urls is not None:
        message["image_urls"] = list(image_urls)
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def iso_time(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + ".%03dZ" % int(at % 1 * 1000)


def message_id() -> str:
    return "msg_" + uuidlib.uuid4().hex


def final_notice(task: Task, at: float, image_urls: tuple[str, ...] | None = None) -> Notice | None:
    """The message of a task's end, for finish_task (written only if the task subscribed)."""
    event = FINAL_EVENTS.get(task.status)
    return None if event is None else Notice(message_id(), event, body(event, at, task.document, image_urls), at)


def expired_notice(uuid: str, at: float, reason: str) -> Notice:
    data = {"data": {"uuid": uuid, "task": {"uuid": uuid, "taskStatus": EXPIRED, "errorMessage": reason}}}
    return Notice(message_id(), FINAL_EVENTS[EXPIRED], body(FINAL_EVENTS[EXPIRED], at, data), at)


def message_object(message: WebhookMessage, admin: bool = False) -> dict[str, Any]:
    """A message as GET /v1/webhooks and /admin/webhooks list it (never its body's secrets: it has none)."""
    shown = {"id": message.id, "object": "webhook.message", "type": message.type, "task_id": message.task,
             "url": message.url, "status": message.status, "attempts": message.attempts,
             "last_status": message.last_status, "last_error": message.last_error,
             "next_attempt_at": message.next_at if message.status == "pending" else None,
             "created_at": message.created_at, "delivered_at": message.delivered_at}
    return {**shown, "key": message.key} if admin else shown


class Webhooks:
    """Subscriptions at submit, and the messages of tasks as they progress."""

    def __init__(self, store: Store, *, keys: Callable[[], KeyRing], secrets: tuple[bytes, ...],
                 allowed_hosts: frozenset[str], clock: Callable[[], float],
                 poke: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.keys = keys
        self.secrets = secrets  # the webhook_secret setting's
        self.clock = clock
        self.poke = poke  # tells the deliverer a message is waiting
        self.resolver = webhook_resolver(allowed_hosts)
        self._checked: ResultCache[bool, tuple[str, int]] = ResultCache(1000, CHECKED_SECONDS)
        self._enabled: ResultCache[bool, tuple[str, str]] = ResultCache(10_000, ENABLED_SECONDS)
        # uuid -> (its key, its subscription or None, the last (status, progress) seen)
        self._subscriptions: ResultCache[tuple[str, Subscription | None, Any], str] = ResultCache(
            SUBSCRIPTIONS_CACHED, float("inf"))
        self._lookups: set[asyncio.Future[None]] = set()  # held, so that a running one is not collected
        self._looking: set[str] = set()  # tasks whose subscription is being looked up

    def key_in_force(self, key: str) -> bool:
        """Whether `key`'s messages may still be sent: a revoked key's are given up, never signed
        with the shared secret for a party that is gone."""
        keys = self.keys()
        return not keys or keys.find(key) is not None

    def secrets_for(self, key: str) -> tuple[bytes, ...]:
        """The secrets that sign `key`'s messages now: its own in the keys file, else the setting's."""
        tenant = self.keys().find(key)
        return (tenant.webhook_secrets if tenant is not None else ()) or self.secrets

    async def subscribe(self, caller: Caller, asked: WebhookRequest | None) -> Subscription | None:
        """The submit's subscription, checked; ApiError (400) before anything is spent if it cannot be kept."""
        tenant = self.keys().find(caller.name)
        url = asked.url if asked is not None and asked.url is not None else tenant.webhook_url if tenant else None
        if url is None:
            if asked is not None:
                raise invalid("webhook_events needs a webhook URL (in the request, or the key's webhook_url)",
                              param="webhook_events", code="missing_value")
            return None
        param = "webhook" if asked is not None and asked.url is not None else None
        if not self.secrets_for(caller.name):
            raise ApiError(400, "Webhooks are signed, and no webhook secret is configured for this key: ask the "
                                "operator to set webhook_secret", param=param, code="webhook_secret_not_configured")
        await self.check_url(url, param)
        if not self._enabled.get((caller.name, url)):
            if await self.store.url_disabled(caller.name, url):
                raise ApiError(400, "This webhook URL answered 410 Gone and is disabled for this key; an admin "
                               "re-enables it by retrying one of its messages (POST /admin/webhooks/{id}/retry)",
                               param=param, code="webhook_url_disabled")
            self._enabled.put((caller.name, url), True)
        return Subscription(url, asked.events if asked is not None and asked.events else DEFAULT_EVENTS)

    async def check_url(self, url: str, param: str | None) -> None:
        _, host, port = origin(url)
        if self._checked.get((host, port)):
            return
        try:
            await self.resolver.resolve(host, port)
        except NotPublic:
            raise ApiError(400, "The webhook URL's host resolves to a loopback, private or otherwise non-public "
                                "address (the operator can allow it in webhook_hosts)", param=param,
                           code="invalid_webhook_url") from None
        except OSError:
            raise ApiError(400, "The webhook URL's host does not resolve", param=param,
                           code="invalid_webhook_url") from None
        self._checked.put((host, port), True)

    def disabled(self, key: str, url: str) -> None:
        """This instance saw the URL answer 410 for `key`: its next submits are refused at once."""
        self._enabled.put((key, url), False)

    async def retry(self, message_id: str) -> WebhookMessage | None:
        """An admin's retry: the message is due now, and its URL enabled again for its key."""
        message = await self.store.retry_webhook(message_id, self.clock())
        if message is not None:
            self._enabled.put((message.key, message.url), True)
            self.poke()
        return message

    def remember(self, uuid: str, key: str, subscription: Subscription | None) -> None:
        """A task submitted here: its subscription is known without asking the store."""
        self._subscriptions.put(uuid, (key, subscription, None))

    def progressed(self, task: Task) -> None:
        """The engine read a running task: a task.progress message if it asked for them and the
        status or progress changed. Never delays the read (a lookup runs on its own)."""
        if task.is_final:
            return
        known = self._subscriptions.get(task.uuid)
        if known is not None:
            return self._progress(task, *known)
        if task.uuid in self._looking:  # one lookup per task, however many reads meanwhile
            return
        self._looking.add(task.uuid)
        lookup = asyncio.ensure_future(self._look_up(task))
        self._lookups.add(lookup)
        lookup.add_done_callback(self._lookups.discard)

    async def _look_up(self, task: Task) -> None:
        """A task submitted elsewhere (another instance, or before a restart): its subscription
        from the store, remembered (also when it has none)."""
        try:
            record = await self.store.get_task(task.uuid)
        except StoreUnavailable:
            return
        finally:
            self._looking.discard(task.uuid)
        if record is None:
            return
        subscription = None
        if record.webhook_url and record.webhook_events:
            subscription = Subscription(record.webhook_url, tuple(record.webhook_events))
        known = self._subscriptions.get(task.uuid) or (record.key, subscription, None)
        self._progress(task, *known)

    def _progress(self, task: Task, key: str, subscription: Subscription | None, last: Any) -> None:
        state = (task.status, task.progress)
        self._subscriptions.put(task.uuid, (key, subscription, state))
        if subscription is None or PROGRESS not in subscription.events or state == last:
            return
        now = self.clock()
        message = WebhookMessage(message_id(), key, task.uuid, PROGRESS, subscription.url,
                                 body(PROGRESS, now, task.document), now, next_at=now)
        task_ = asyncio.ensure_future(self._add(message))
        self._lookups.add(task_)
        task_.add_done_callback(self._lookups.discard)

    async def _add(self, message: WebhookMessage) -> None:
        await self.store.add_webhook(message)  # kept and retried by the store: it never raises
        self.poke()


def webhook_resolver(allowed_hosts: frozenset[str]) -> Resolver:
    """Public addresses only, except the hosts (any port) and host:port pairs of webhook_hosts."""
    pairs, hosts = set(), set()
    for word in allowed_hosts:
        if word.startswith("[") and "]:" in word:  # [::1]:8080
            host, _, port = word[1:].partition("]:")
        elif word.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            host, _, port = word.partition(":")
        else:
            hosts.add(word.strip("[]"))
            continue
        if not port.isdigit():
            raise ValueError("webhook_hosts: %r has a port that is not a number" % word[:100])
        pairs.add((host, int(port)))
    return PublicOnlyResolver(allowed=frozenset(pairs), allowed_hosts=frozenset(hosts))
