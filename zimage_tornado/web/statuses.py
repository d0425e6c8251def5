"""The one place that decides what a client is answered when something did not go to plan: an
exception, or a wait that ended without pictures, becomes one ApiError (status, envelope,
headers). Handlers raise; BaseHandler.write_error and the event stream call `api_error`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tornado.web import HTTPError

from zimage_tornado.accounts import Refused, TooManyCallerWaiters
from zimage_tornado.domain import COMPLETED, FAILED, Task
from zimage_tornado.errors import ApiError
from zimage_tornado.store import Admission, NotRecorded, StoreUnavailable
from zimage_tornado.upstream import (TaskNotFound, UpstreamError, UpstreamOutcomeUnknown, UpstreamRejected,
                                     UpstreamTimeout)
from zimage_tornado.watcher import INTERRUPTED, TIMEOUT, Outcome, TooManyWaiters


class ShuttingDown(Exception):
    """A new request arrived while the gateway stops."""


class OutcomeError(Exception):
    """A wait that ended without pictures, raised by a handler to answer what it means."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.state)
        self.outcome = outcome


# Raised by handlers and mapped here; anything else reaching write_error is a bug (logged, 500).
EXPECTED = (ApiError, UpstreamError, TooManyWaiters, ShuttingDown, OutcomeError, HTTPError, Refused,
            TooManyCallerWaiters, StoreUnavailable)


def retry_seconds(poll_interval: float) -> int:
    """What Retry-After says when the gateway itself asks a client to come back."""
    return math.ceil(poll_interval)


@dataclass(frozen=True)
class Context:
    """What the mapping needs to know about the request being answered."""

    method: str
    path: str
    retry_after: float  # the poll interval: how soon asking again can tell something new
    task_uuid: str | None = None
    submitted: bool = False  # the upstream accepted a task for this request: a retry would pay twice
    status: int = 500  # Tornado's status, for its own HTTPErrors
    reason: str = ""


def api_error(cause: BaseException | None, context: Context) -> ApiError:
    error = _map(cause, context)
    if context.submitted and context.task_uuid:
        # The task exists upstream: the OpenAI SDK must not resubmit (and pay) again.
        error.headers["x-should-retry"] = "false"
        if context.task_uuid not in error.message:
            error.message += " (task %s was accepted; fetch it later with GET /v1/images/%s)" % (
                context.task_uuid, context.task_uuid)
        error.extra.setdefault("uuid", context.task_uuid)
    return error


def _map(cause: BaseException | None, context: Context) -> ApiError:
    retry_after = {"Retry-After": str(retry_seconds(context.retry_after))}
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, OutcomeError):
        return _outcome(cause.outcome, retry_after, context)
    if isinstance(cause, UpstreamOutcomeUnknown):
        # The job may exist and be paid for: no client, SDK or person should resubmit it blindly.
        return ApiError(504, "%s. Do not resubmit: the job may exist upstream. A retry with the same "
                        "Idempotency-Key gets this answer again." % cause, type="upstream_error",
                        code=cause.code, headers={"x-should-retry": "false"})
    if isinstance(cause, UpstreamError):
        headers = {"Retry-After": str(math.ceil(cause.retry_after))} if cause.retry_after else {}
        extra = {"uuid": context.task_uuid} if context.task_uuid else {}
        return ApiError(upstream_status(cause), str(cause), type="upstream_error", code=cause.code,
                        headers=headers, extra=extra)
    if isinstance(cause, TooManyWaiters):
        return ApiError(503, "Too many clients are waiting on tasks; retry shortly", type="server_error",
                        code="too_many_waiters", headers=retry_after)
    if isinstance(cause, Refused):
        return refused(cause.admission, cause.kind)
    if isinstance(cause, TooManyCallerWaiters):
        return ApiError(429, "Too many of this key's clients are waiting on tasks; retry when one is answered",
                        type="rate_limit_error", code="too_many_waiters", headers=retry_after)
    if isinstance(cause, NotRecorded):
        return ApiError(503, "Task %s was accepted upstream, but the gateway's store could not record it yet (%s); "
                        "it is recorded as soon as the store can be written. Do not resubmit" % (cause.uuid, cause),
                        type="server_error", code="state_unavailable", headers=retry_after)
    if isinstance(cause, StoreUnavailable):
        return ApiError(503, "%s; nothing was submitted, retry shortly" % cause, type="server_error",
                        code="state_unavailable", headers=retry_after)
    if isinstance(cause, ShuttingDown):
        return ApiError(503, "The gateway is shutting down; retry shortly", type="server_error",
                        code="shutting_down", headers={**retry_after, "Connection": "close"})
    if isinstance(cause, HTTPError) or cause is None:
        status = cause.status_code if isinstance(cause, HTTPError) else context.status
        message = context.reason if status == context.status and context.reason else "HTTP %d" % status
        if status == 405:
            message = "Method %s is not allowed on %s" % (context.method, context.path)
        return ApiError(status, message, type="invalid_request_error" if status < 500 else "server_error")
    # Never show a client the text of an unexpected exception.
    return ApiError(500, "Internal server error", type="server_error", code="internal_error")


def refused(admission: Admission, kind: str = "requests") -> ApiError:
    """A submit (or, `kind` "reads", a task read) over the caller's limits: nothing reached the upstream."""
    wait = math.ceil(admission.retry_after or 1)
    headers = {"Retry-After": str(wait)}
    if admission.reason == "insufficient_quota" and admission.images is not None:
        headers["x-should-retry"] = "false"  # retrying cannot help before the reset
        return ApiError(429, "The daily quota of %d images is spent (%d left); it resets at 00:00 UTC, in %ds"
                        % (admission.images.limit, admission.images.remaining, wait), type="insufficient_quota",
                        code="insufficient_quota", headers=headers)
    limit = admission.requests.limit if admission.requests else 0
    what = "task reads and picture downloads" if kind == "reads" else "requests"
    return ApiError(429, "Rate limit reached: %d %s per minute; retry in %ds" % (limit, what, wait),
                    type="rate_limit_error", code="rate_limit_exceeded", headers=headers)


def upstream_status(error: UpstreamError) -> int:
    """A definite 4xx from the upstream (429 included) is the client's to know; an unknown task is
    404; a timeout 504; anything else is a bad gateway."""
    if isinstance(error, TaskNotFound):
        return 404
    if isinstance(error, (UpstreamTimeout, UpstreamOutcomeUnknown)):
        return 504
    status = error.upstream_status or 0
    if isinstance(error, UpstreamRejected) and 400 <= status < 500:
        return status
    return 502


def _outcome(outcome: Outcome, retry_after: dict[str, str], context: Context) -> ApiError:
    task = outcome.task
    if outcome.state == FAILED and task is not None:
        return task_failed(task)
    if outcome.state == TIMEOUT:
        return wait_timed_out(outcome.uuid, outcome.waited, task, outcome.error)
    if outcome.state == INTERRUPTED:
        return ApiError(503, "The gateway is shutting down; task %s goes on" % outcome.uuid, type="server_error",
                        code="shutting_down", headers=retry_after)
    if outcome.state == COMPLETED:  # not an error: a caller asked for one by mistake
        return ApiError(500, "Internal server error", type="server_error", code="internal_error")
    if outcome.error is not None:
        return _map(outcome.error, context)
    return ApiError(502, "No answer for task %s" % outcome.uuid, type="upstream_error")


def task_failed(task: Task) -> ApiError:
    reason = task.error or "the upstream reported the task as failed"
    return ApiError(502, "Task %s failed: %s" % (task.uuid, reason), type="upstream_error", code="task_failed",
                    extra={"uuid": task.uuid, "status": FAILED, "reason": reason, "task_info": task.raw})


def wait_timed_out(uuid: str, seconds: float, task: Task | None, upstream_error: UpstreamError | None) -> ApiError:
    """The budget ran out. If the upstream's last answer was a failure, name it (502/504)."""
    extra: dict[str, Any] = {
        "uuid": uuid,
        "status": "timeout",
        "last_status": task.status if task else None,
        "progress": task.progress if task else None,
    }
    if upstream_error is not None:
        extra["upstream_error"] = str(upstream_error)
        return ApiError(504 if isinstance(upstream_error, UpstreamTimeout) else 502,
                        "Task %s: still waiting after %gs and the upstream is failing: %s"
                        % (uuid, seconds, upstream_error), type="upstream_error",
                        code="upstream_unavailable", extra=extra)
    return ApiError(504, "Task %s is still %s after %gs; ask again later"
                    % (uuid, extra["last_status"] or "running", seconds), type="timeout_error",
                    code="timeout", extra=extra)
