"""ZImageClient: the only module that knows Z-Image's wire format.

Every failure, whatever its cause, leaves as one UpstreamError subclass carrying what happened
(its kind, the upstream's HTTP status if it answered) and a message that is safe to show a
client (never exception text). Which status a client then sees is web/statuses.py's decision.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.request
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

from zimage_tornado import SERVICE_NAME, __version__, logs, validation
from zimage_tornado.domain import COMPLETED, FAILED, FINAL_STATES, PENDING, PROCESSING, GenerationRequest, Task
from zimage_tornado.pooled_http import PooledHTTPClient
from zimage_tornado.validation import TASK_ID_RE

log = logging.getLogger("zimage_tornado.upstream")
T = TypeVar("T")

KNOWN_STATES = FINAL_STATES | {PENDING, PROCESSING}
MAX_MESSAGE = 500
CURLE_OPERATION_TIMEDOUT = 28
# could not resolve the host or connect; TLS handshake or certificate failures: no byte of the
# request left, so a submit that failed this way certainly made no job
CURLE_NOT_CONNECTED = (6, 7, 35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91)
CONNECT_TIMEOUTS = ("Timeout while connecting", "Connection timed out after", "Resolving timed out")


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (http_proxy, https_proxy, no_proxy), if any."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):  # no_proxy
        return None
    return proxy


def make_http_client(kind: str, *, max_clients: int, connect_timeout: float, request_timeout: float,
                     ca_certs: str = "", url: str = "") -> AsyncHTTPClient:
    """A client of our own, not the per-loop singleton: that one has 10 slots, and time spent
    queueing for a slot counts against request_timeout.

    "pooled" (the default, pooled_http.py) keeps connections alive on Tornado's own parser: less
    CPU and latency a submit than "curl" (bench/submit.py), answers bounded in size, and a POST
    sent once by construction. "simple" opens a connection per call (half the throughput)."""
    defaults: dict[str, Any] = {
        "connect_timeout": connect_timeout,  # the upstream host is down or unreachable
        "request_timeout": request_timeout,  # the whole call, queueing for a slot included
    }
    system = ssl.get_default_verify_paths().cafile
    if ca_certs or (system and os.path.exists(system)):
        # Named explicitly: pycurl's bundled libcurl has no default bundle of its own.
        defaults["ca_certs"] = ca_certs or system
    if kind == "pooled" and url and environment_proxy(url):
        # libcurl goes through the proxy the environment names, as it always did here; the pooled
        # client connects directly, which a network that only lets a proxy out would refuse
        log.info("upstream: the environment names a proxy for %s; the curl client goes through it",
                 logs.redact_url(url))
        kind = "curl"
    if kind == "pooled":
        return PooledHTTPClient(force_instance=True, max_clients=max_clients, defaults=defaults)
    if kind == "curl":
        from tornado.curl_httpclient import CurlAsyncHTTPClient

        return CurlAsyncHTTPClient(force_instance=True, max_clients=max_clients, defaults=defaults)
    return SimpleAsyncHTTPClient(force_instance=True, max_clients=max_clients, defaults=defaults)


class UpstreamError(Exception):
    code = "upstream_error"
    transient = True  # worth asking again at the next poll

    def __init__(self, message: str, *, upstream_status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status  # the HTTP status the upstream answered with, if any
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"


class UpstreamRejected(UpstreamError):
    """The upstream said no (`success: false` or an error status)."""

    code = "upstream_rejected"

    def __init__(self, message: str, *, upstream_status: int | None = None, retry_after: float | None = None,
                 readable: bool = True) -> None:
        super().__init__(message, upstream_status=upstream_status, retry_after=retry_after)
        self.readable = readable  # the answer was the service's own JSON, not a proxy's error page

    @property
    def definite(self) -> bool:
        """A refusal that certainly made no job: the service's own `success: false`, or a 4xx
        (the request was refused before any work). A 5xx page from a front proxy is in doubt."""
        status = self.upstream_status or 0
        return self.readable or 400 <= status < 500

    @property
    def transient(self) -> bool:  # type: ignore[override]
        # A 4xx other than 429 is a definite no; a 5xx, a 429 or a success:false may pass.
        status = self.upstream_status or 0
        return not (400 <= status < 500) or status == 429


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"


class ContentRefused(UpstreamRejected):
    """The service's moderation step refused the prompt: nothing was made."""

    code = "content_policy_violation"


class UpstreamAuthRequired(UpstreamError):
    """The service answered with a browser check (a Cloudflare challenge, Turnstile) instead of its
    API: nothing was made, and a server cannot pass the check; the gateway never tries. Its calls
    stop for AUTH_COOLDOWN_SECONDS, so that a check is met at most once that often."""

    code = "provider_auth_required"
    transient = False


# A challenge page instead of the API's answer (lower-cased, in the first part of the body).
CHALLENGE_MARKS = (b"just a moment", b"challenge-platform", b"cf-chl", b"turnstile", b"verify-anonymous",
                   b"attention required! | cloudflare")
AUTH_COOLDOWN_SECONDS = 30.0


def browser_check(response: HTTPResponse) -> bool:
    """The answer is a browser check, not the service's API."""
    if response.headers.get("cf-mitigated", "").lower() == "challenge":
        return True
    if response.code not in (401, 403, 429, 503):
        return False
    head = (response.body or b"")[:8192].lower()
    return any(mark in head for mark in CHALLENGE_MARKS)


class ImageTooLarge(Exception):
    """Raised from a download's own callbacks to stop it at max_image_bytes."""


def _not_a_stopped_download(record: logging.LogRecord) -> bool:
    """Tornado logs an exception from a body callback as "Uncaught exception" (and, if the fetch
    was cancelled meanwhile, the connection's close that follows it); stopping a download at the
    limit is how its client is told to stop, and the gateway answers and logs that itself."""
    error = record.exc_info[1] if record.exc_info else None
    for _ in range(4):  # the stop, or what it led to (its __context__)
        if error is None:
            return True
        if isinstance(error, ImageTooLarge):
            return False
        error = error.__cause__ or error.__context__
    return True


logging.getLogger("tornado.application").addFilter(_not_a_stopped_download)


class UpstreamOutcomeUnknown(UpstreamError):
    """A submit reached (or may have reached) the upstream, and no readable answer came back: the
    job may exist and be paid for. Never retried, never refunded: see statuses.py."""

    code = "upstream_outcome_unknown"
    transient = False


class TaskNotFound(UpstreamError):
    code = "task_not_found"
    transient = False


def _send_once(curl: Any) -> None:
    """A submit is never sent twice. When a reused keep-alive connection dies after the request
    went out, libcurl silently sends it again on a new one (two paid jobs), and no option turns
    that off; but it must rewind the body first. Refusing the rewind makes it fail instead
    (CURLE_SEND_FAIL_REWIND), while keep-alive stays for every submit that goes well."""
    import pycurl

    curl.setopt(pycurl.SEEKFUNCTION, lambda offset, origin: pycurl.SEEKFUNC_FAIL)


def never_connected(error: BaseException) -> bool:
    """True when the request cannot have reached the upstream: refused, no such host, a TLS
    failure, or a timeout while still connecting."""
    if isinstance(error, (ConnectionRefusedError, ssl.SSLError)) or getattr(error, "never_sent", False):
        return True
    if isinstance(error, HTTPClientError) and getattr(error, "errno", None) in CURLE_NOT_CONNECTED:  # curl's
        return True
    return any(phrase in str(error) for phrase in CONNECT_TIMEOUTS)


def encode_generate(request: GenerationRequest) -> dict[str, Any]:
    """The submit body. Kept in one place: the service's camelCase variant is a change here only."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model": request.model,
        "batch_size": request.batch_size,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
    }


def encode_camel(request: GenerationRequest, moderation_token: str | None = None) -> dict[str, Any]:
    """The submit body in the camelCase the service's later clients send."""
    body: dict[str, Any] = {"prompt": request.prompt, "negativePrompt": request.negative_prompt,
                            "modelType": request.model, "batchSize": request.batch_size, "width": request.width,
                            "height": request.height, "steps": request.steps, "cfgScale": request.cfg_scale}
    if moderation_token is not None:
        body["promptModerationToken"] = moderation_token
    return body


def asks_for(error: UpstreamRejected, *fields: str) -> bool:
    """A refusal (a 400) that names one of `fields`: the service wants the other protocol, or a step."""
    return error.upstream_status == 400 and any(field.lower() in str(error).lower() for field in fields)


CAMEL_FIELDS = ("modelType", "batchSize", "camelCase")
MAX_BATCHES = 100_000  # batch uuids remembered (their reads go to batch-status); a forgotten one is found again


Observer = Callable[[str, str, float], None]  # (kind, outcome, seconds)


class ZImageClient:
    def __init__(self, base_url: str, http: AsyncHTTPClient, observer: Observer | None = None,
                 image_http: AsyncHTTPClient | None = None, api_key: str = "", cookie: str = "",
                 protocol: str = "auto") -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._image_http = image_http or http  # images.make_image_client(): a pool of their own
        self._curl = type(http).__name__ == "CurlAsyncHTTPClient"
        self._observer = observer
        self.headers = {
            "Accept": "application/json",
            "User-Agent": "%s/%s" % (SERVICE_NAME, __version__),
        }
        if api_key:  # upstream_api_key: API calls only, never image downloads (another host); never logged
            self.headers["Authorization"] = "Bearer " + api_key
        if cookie:  # an operator's own session with the service (upstream_cookie_env); never logged
            self.headers["Cookie"] = cookie
        self.checked_until = 0.0  # monotonic time until which a browser check keeps the service out
        # flat (the original snake_case) or camel; auto starts flat and follows what the service accepts
        self.protocol = "flat" if protocol == "auto" else protocol
        self.follows = protocol == "auto"
        self.moderated = False  # the service asked for its moderation step: taken before every submit
        self.batches: dict[str, None] = {}  # parent uuids of batches (read through batch-status), oldest first
        self.last_answer_at: float | None = None  # monotonic time of the last HTTP answer, any status
        self.last_failure: tuple[float, str] | None = None  # when and why it last could not be reached

    async def submit(self, request: GenerationRequest) -> Task:
        return await self._observed("submit", self._submit(request))

    async def get_task(self, uuid: str) -> Task:
        return await self._observed("task", self._get_task(uuid))

    async def fetch_image(self, url: str, max_bytes: int, aborted: Callable[[], bool] = lambda: False) -> bytes:
        """One result image, for b64_json answers: at most `max_bytes`; nothing more is kept
        once `aborted()` is true (a sibling failed)."""
        return await self._observed("image", self._fetch_image(url, max_bytes, aborted))

    async def _observed(self, kind: str, call: Awaitable[T]) -> T:
        started = time.monotonic()
        outcome = "ok"
        try:
            return await call
        except UpstreamError as e:
            outcome = e.code
            raise
        finally:
            if self._observer is not None:
                self._observer(kind, outcome, time.monotonic() - started)

    async def _submit(self, request: GenerationRequest) -> Task:
        log.debug("submitting task: model=%s batch_size=%d size=%dx%d steps=%d",
                 request.model, request.batch_size, request.width, request.height, request.steps)
        for _ in range(3):  # a definite refusal that names another protocol or a step: asked again, once each
            try:
                document = await self._call("POST", "/api/z-image/generate", await self._body(request))
            except UpstreamRejected as e:
                if not e.definite:
                    raise UpstreamOutcomeUnknown("%s; the task may have been created upstream" % e,
                                                 upstream_status=e.upstream_status) from e
                if self.follows and self.protocol == "flat" and asks_for(e, *CAMEL_FIELDS):
                    log.info("upstream: it asks for camelCase submits; switching to them")
                    self.protocol = "camel"
                    continue
                if self.protocol == "camel" and not self.moderated and asks_for(e, "promptModerationToken"):
                    log.info("upstream: it asks for its moderation step; taking it before every submit")
                    self.moderated = True
                    continue
                raise
            except UpstreamBadResponse as e:  # an answer that cannot be read
                raise UpstreamOutcomeUnknown("%s; the task may have been created upstream" % e) from e
            return self._accepted(document)
        raise UpstreamRejected("The upstream refused the submit in every protocol it was sent in", upstream_status=400)

    async def _body(self, request: GenerationRequest) -> dict[str, Any]:
        if self.protocol == "flat":
            return encode_generate(request)
        return encode_camel(request, await self._moderate(request.prompt) if self.moderated else None)

    async def _moderate(self, prompt: str) -> str:
        """The service's moderation step: its token for the submit, or ContentRefused."""
        document = await self._call("POST", "/api/prompt-moderation/check",
                                    {"prompt": prompt, "routeKey": "text_to_image", "targetType": "image"})
        data = document.get("data")
        data = data if isinstance(data, dict) else {}
        if data.get("allowed") is not True:
            reason = data.get("reason") or data.get("message")
            raise ContentRefused("The upstream's moderation refused the prompt%s; nothing was made"
                                 % (": %s" % str(reason)[:MAX_MESSAGE] if reason else ""), upstream_status=400)
        token = data.get("promptModerationToken")
        if not isinstance(token, str) or not 0 < len(token) <= 4096:
            raise UpstreamBadResponse("The upstream's moderation allowed the prompt but gave no usable token")
        return token

    def _accepted(self, document: dict[str, Any]) -> Task:
        data = document.get("data")
        data = data if isinstance(data, dict) else {}
        parent = data.get("parentTaskUuid")
        if isinstance(parent, str) and TASK_ID_RE.fullmatch(parent) and not data.get("uuid"):
            self._remember_batch(parent)  # a batch: followed as one task by its parent's uuid
            return Task(uuid=parent, status=PENDING, raw=data, document=document)
        task = data.get("task")
        task = task if isinstance(task, dict) else {}
        uuid = data.get("uuid") or task.get("uuid")
        # The uuid goes back into our own paths later: accept only what a client could send us.
        if not isinstance(uuid, str) or not TASK_ID_RE.fullmatch(uuid):
            log.warning("upstream accepted a task but sent no usable uuid: %.200r", document)
            raise UpstreamOutcomeUnknown("The upstream answered without a usable task uuid; the task may have "
                                         "been created upstream")
        log.debug("task %s submitted", uuid)  # at info, the access line names it (task=)
        return parse_task(uuid, task, document, default_status=PENDING)

    def _remember_batch(self, uuid: str) -> None:
        self.batches[uuid] = None
        while len(self.batches) > MAX_BATCHES:
            del self.batches[next(iter(self.batches))]

    async def _get_task(self, uuid: str) -> Task:
        if uuid in self.batches:
            return await self._get_batch(uuid)
        try:
            return await self._get_single(uuid)
        except TaskNotFound:
            if self.protocol != "camel":
                raise
            task = await self._get_batch(uuid)  # a batch this process did not submit (or forgot)
            self._remember_batch(uuid)
            return task

    async def _get_batch(self, uuid: str) -> Task:
        document = await self._call("GET", "/api/z-image/batch-status/%s" % uuid, task_uuid=uuid)
        data = document.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
            raise UpstreamBadResponse("The upstream's batch answer has no list of tasks")
        return parse_batch(uuid, data, document)

    async def _get_single(self, uuid: str) -> Task:
        document = await self._call("GET", "/api/z-image/task/%s" % uuid, task_uuid=uuid)
        data = document.get("data")
        if not isinstance(data, dict):
            raise UpstreamBadResponse("The upstream's task answer has no data object")
        task = data.get("task")
        if not isinstance(task, dict):
            task = data if "taskStatus" in data else None
        if task is None:
            raise UpstreamBadResponse("The upstream's task answer has no task object")
        parsed = parse_task(uuid, task, document)
        log.debug("task %s is %s (%s%%)", uuid, parsed.status, parsed.progress)
        return parsed

    async def _fetch_image(self, url: str, max_bytes: int, aborted: Callable[[], bool]) -> bytes:
        if not url.lower().startswith(("http://", "https://")):
            raise UpstreamBadResponse("The upstream gave an image URL that is not http(s)")
        chunks: list[bytes] = []
        size = 0
        too_large = ""  # why the download was stopped, once it was

        # The limit is kept here, byte-exact, by stopping the download from its own callbacks: the
        # HTTP client's max_body_size (a backstop) is checked per chunk of the host's chunked
        # encoding and ends in a bare "Stream closed" that cannot be told from a host hanging up.
        def stop(why: str) -> None:
            nonlocal too_large
            too_large = "An image is larger than %d bytes%s" % (max_bytes, why)
            raise ImageTooLarge(too_large)

        def collect(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > max_bytes:
                stop("")
            if not aborted():
                chunks.append(chunk)

        def header(line: str) -> None:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and (validation.content_length(value) or 0) > max_bytes:
                stop("; not fetched")

        try:
            response = await self._fetch("The image host", url, http=self._image_http, streaming_callback=collect,
                                         header_callback=header, headers={"User-Agent": self.headers["User-Agent"]})
        except (ImageTooLarge, UpstreamError) as e:  # curl reports a callback's exception as its own failure
            if too_large:
                raise UpstreamBadResponse(too_large) from e
            raise
        if response.code != 200:
            raise UpstreamBadResponse("The image host answered HTTP %d" % response.code)
        return b"".join(chunks)

    def _auth_required(self, until: float) -> UpstreamAuthRequired:
        return UpstreamAuthRequired(
            "%s demands a browser check (a Cloudflare challenge) that a server cannot pass; nothing was submitted. "
            "Give the gateway a session of your own (upstream_cookie_env) or another upstream; it is asked again "
            "in %ds" % (logs.redact_url(self.base_url), max(1, round(until - time.monotonic()))),
            retry_after=max(1.0, until - time.monotonic()))

    async def _call(self, method: str, path: str, body: Any = None, task_uuid: str | None = None) -> dict[str, Any]:
        if time.monotonic() < self.checked_until:  # out after a browser check: not asked again yet
            raise self._auth_required(self.checked_until)
        url = self.base_url + path
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        once: dict[str, Any] = {"prepare_curl_callback": _send_once} if method == "POST" and self._curl else {}
        response = await self._fetch("The upstream", url, method=method, headers=headers,
                                     body=None if body is None else json.dumps(body), **once)
        return self._decode(response, task_uuid)

    async def _fetch(self, who: str, url: str, http: AsyncHTTPClient | None = None, **kwargs: Any) -> HTTPResponse:
        """fetch() with every transport failure mapped to an UpstreamError. Timeouts come from the
        client's defaults (the upstream_* settings); raise_error=False so that HTTP error statuses
        arrive as responses whose bodies can be read."""
        request_id = logs.request_id.get()
        if request_id != "-":
            kwargs["headers"] = {**kwargs.get("headers", {}), "X-Request-ID": request_id}
        method = kwargs.get("method", "GET")
        try:
            response = await (http or self._http).fetch(url, raise_error=False, **kwargs)
        except (HTTPClientError, OSError, StreamClosedError) as e:
            timeout = isinstance(e, HTTPTimeoutError) or getattr(e, "errno", None) == CURLE_OPERATION_TIMEDOUT
            message = "%s did not answer in time" % who if timeout else "%s could not be reached" % who
            error: UpstreamError = UpstreamTimeout(message) if timeout else UpstreamUnavailable(message)
            if method == "POST" and not never_connected(e):  # the request may have arrived: a job may exist
                error = UpstreamOutcomeUnknown(message + "; the task may have been created upstream")
            self._transport_failed(method, url, e, error)
            raise error from e
        self.last_answer_at = time.monotonic()
        return response

    def _transport_failed(self, method: str, url: str, cause: Exception, error: UpstreamError) -> None:
        log.warning("%s %s failed: %s", method, logs.redact_url(url), cause)
        self.last_failure = (time.monotonic(), str(error))

    def _decode(self, response: HTTPResponse, task_uuid: str | None) -> dict[str, Any]:
        if response.code == 599:  # a transport failure reported as a response
            raise UpstreamUnavailable("The upstream could not be reached")
        if browser_check(response):
            if time.monotonic() >= self.checked_until:
                log.warning("upstream %s answered with a browser check; not asked again for %ds",
                            logs.redact_url(self.base_url), AUTH_COOLDOWN_SECONDS)
            self.checked_until = time.monotonic() + AUTH_COOLDOWN_SECONDS
            raise self._auth_required(self.checked_until)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            document = json.loads(response.body or b"")
        except (ValueError, UnicodeDecodeError, RecursionError):
            document = None
        if not isinstance(document, dict):
            if response.code == 404 and task_uuid:
                raise TaskNotFound("Task %s was not found upstream" % task_uuid)
            if response.code >= 400:
                raise UpstreamRejected("The upstream answered HTTP %d" % response.code,
                                       upstream_status=response.code, retry_after=retry_after, readable=False)
            raise UpstreamBadResponse("The upstream answered with something that is not a JSON object")
        if response.code < 400 and document.get("success") is not False:
            return document
        message = upstream_message(document) or "The upstream answered HTTP %d" % response.code
        if task_uuid and (response.code == 404 or (response.code < 400 and "not found" in message.lower())):
            raise TaskNotFound("Task %s was not found upstream: %s" % (task_uuid, message))
        raise UpstreamRejected(message, upstream_status=response.code, retry_after=retry_after)


def upstream_message(document: dict[str, Any]) -> str | None:
    for key in ("error", "message", "errorMessage"):
        value = document.get(key)
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, str) and value.strip():
            return value.strip()[:MAX_MESSAGE]
    return None


def parse_retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: rare enough to ignore
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None


def parse_task(uuid: str, task: dict[str, Any], document: dict[str, Any], default_status: str = PROCESSING) -> Task:
    status = task.get("taskStatus", task.get("status", default_status))
    status = status.lower() if isinstance(status, str) else default_status
    if status not in KNOWN_STATES:
        log.info("task %s has unknown status %r; treating it as still running", uuid, status)
    image_urls = result_urls(task)
    if status == COMPLETED and not image_urls:
        raise UpstreamBadResponse("The upstream says task %s completed but gave no image URLs" % uuid)
    error = None
    if status == FAILED:
        error = next((task[k] for k in ("errorMessage", "error", "failReason")
                      if isinstance(task.get(k), str) and task[k].strip()), None)
        error = error[:MAX_MESSAGE] if error else None
    progress = task.get("progress")
    queue_position = task.get("queuePosition")
    return Task(
        uuid=uuid,
        status=status,
        progress=progress if isinstance(progress, (int, float)) and not isinstance(progress, bool) else None,
        image_urls=image_urls,
        error=error,
        queue_position=queue_position if isinstance(queue_position, int) else None,
        raw=task,
        document=document,
    )


def parse_batch(uuid: str, data: dict[str, Any], document: dict[str, Any]) -> Task:
    """A batch (`data.allCompleted`, `data.tasks[{status, resultUrl}]`) as one task: running until
    every picture has ended; then completed with the pictures made (failed if none was)."""
    members = [task for task in data["tasks"] if isinstance(task, dict)][:64]
    states = [str(task.get("status", task.get("taskStatus", ""))).lower() for task in members]
    ended = sum(state in FINAL_STATES for state in states)
    urls = tuple(url for task in members for url in result_urls(task))
    if not members or (data.get("allCompleted") is not True and ended < len(members)):
        progress = 100.0 * ended / len(members) if members else 0.0
        return Task(uuid=uuid, status=PROCESSING, progress=progress, raw=data, document=document)
    if urls:
        return Task(uuid=uuid, status=COMPLETED, progress=100, image_urls=urls, raw=data, document=document)
    errors = [str(task["errorMessage"]) for task in members if isinstance(task.get("errorMessage"), str)]
    reason = (errors[0] if errors else "no picture of the batch was made")[:MAX_MESSAGE]
    return Task(uuid=uuid, status=FAILED, progress=100, error=reason, raw=data, document=document)


def result_urls(task: dict[str, Any]) -> tuple[str, ...]:
    """`resultUrls` (a list), or `resultUrl`: one URL or a JSON-encoded array of them."""
    urls = task.get("resultUrls")
    if urls is None:
        urls = task.get("resultUrl")
        if isinstance(urls, str) and urls.lstrip().startswith("["):
            try:
                urls = json.loads(urls)
            except ValueError:
                urls = None
        elif isinstance(urls, str):
            urls = [urls]
    if not isinstance(urls, list):
        return ()
    # Only http(s) reaches a client: a javascript: or file: URL is dropped here, once.
    return tuple(url for url in urls if isinstance(url, str) and url.lower().startswith(("http://", "https://")))
