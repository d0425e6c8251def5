"""What the admin endpoints answer: the task query from its query-string arguments, key summaries
(limits, today's use, last seen) and CSV renderings of usage and tasks. No HTTP here."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Callable

from zimage_tornado import validation
from zimage_tornado.errors import invalid
from zimage_tornado.links import LinkMaker
from zimage_tornado.store import WEBHOOK_STATES, Store, TaskQuery, TaskRecord, UsageRow
from zimage_tornado.tenants import PLAN_FIELDS, KeyRing
from zimage_tornado.webhooks import message_object

TASK_STATUSES = ("submitted", "completed", "failed", "expired")
USAGE_CSV = ("day", "key", "tasks", "images", "failed", "refused")
TASK_CSV = ("submitted_at", "uuid", "key", "end_user", "client", "model", "width", "height", "batch_size", "steps",
            "status", "finished_at", "image_count", "error", "prompt", "negative_prompt", "image_urls")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")
MAX_PAGE = 1000
MAX_CSV_ROWS = 10_000


def task_query(argument: Callable[[str], str | None], *, high: int = MAX_PAGE, default: int = 50) -> TaskQuery:
    """?key=&status=&since=&until=&before=&limit= as a TaskQuery, each checked (a 400 names it)."""
    status = argument("status")
    if status is not None and status not in TASK_STATUSES:
        raise invalid("status must be one of %s" % ", ".join(TASK_STATUSES), param="status")
    since, until = (validation.day(value, name) if value is not None else None
                    for name, value in (("since", argument("since")), ("until", argument("until"))))
    if since is not None and until is not None and since > until:
        raise invalid("since must not be after until", param="since")
    before = argument("before")
    try:
        cursor = float(before) if before is not None else None
    except ValueError:
        cursor = None
    if before is not None and (cursor is None or not 0 < cursor < 1e11):
        raise invalid("before must be a time in seconds, as next_before gave it", param="before")
    user = argument("end_user")
    if user is not None and (not user or len(user) > 256 or not user.isprintable()):
        raise invalid("end_user must be 1 to 256 printable characters", param="end_user")
    return TaskQuery(key=validation.key_name(argument("key")), status=status, since=since, until=until,
                     end_user=user,
                     before=cursor, limit=validation.count(argument("limit"), "limit", default=default, high=high))


async def own_tasks(store: Store, argument: Callable[[str], str | None],
                    owner: str | None) -> tuple[list[TaskRecord], bool]:
    """GET /v1/tasks: ?limit= (20, at most 100), ?status=, ?after=<an id>, newest first; `owner`'s
    tasks only, unless None (an admin: then ?key= chooses). Also says whether more follow."""
    query = task_query(lambda name: argument(name) if name in ("status", "limit") else None, high=100, default=20)
    key = validation.key_name(argument("key")) if owner is None else owner
    before = None
    after = argument("after")
    if after is not None:
        record = await store.get_task(validation.task_id(after))
        if record is None or (owner is not None and record.key != owner):
            raise invalid("after must be the id of one of your tasks", param="after")
        before = record.submitted_at
    found = await store.find_tasks(dataclasses.replace(query, key=key, before=before, limit=query.limit + 1,
                                                       before_uuid=after))
    return found[:query.limit], len(found) > query.limit  # one more than asked: whether more follow


def task_page(tasks: list[TaskRecord], query: TaskQuery,
              links: LinkMaker | None = None) -> dict[str, Any]:
    """A page of /admin/tasks; `links`: the gateway's own links to kept pictures (then the
    provider's are source_urls), so that thumbnails outlive the provider's links."""
    full = len(tasks) == query.limit
    rows = [task.as_dict() for task in tasks]
    if links is not None:
        for row in rows:
            if row["image_urls"]:
                row["source_urls"] = row["image_urls"]
                row["image_urls"] = list(links(row["uuid"], len(row["image_urls"]), row["batch_size"]))
    return {"object": "list", "data": rows, "has_more": full, "next_before": tasks[-1].submitted_at if full else None}


async def key_summaries(keys: KeyRing, store: Store, today: str) -> list[dict[str, Any]]:
    """Each key's limits, today's use and when it last submitted; never a secret."""
    used = {row.key: row for row in await store.usage(today, today)}
    seen = await store.last_seen(list(keys.names))
    summaries = []
    for tenant in keys.tenants:
        row = used.get(tenant.name)
        summaries.append({"name": tenant.name, "admin": tenant.admin,
                          **{field: getattr(tenant.plan, field) for field in PLAN_FIELDS},
                          "tasks_today": row.tasks if row else 0, "images_today": row.images if row else 0,
                          "refused_today": row.refused if row else 0, "last_seen": seen.get(tenant.name)})
    return summaries


def csv_text(header: tuple[str, ...], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        # A cell starting with = + - @ (or tab, CR, LF, which some spreadsheets skip before one) would run
        # as a formula (prompts are client text): OWASP's list
        writer.writerow(["'" + cell if isinstance(cell, str) and cell[:1] in FORMULA_STARTS else cell
                         for cell in row])
    return out.getvalue()


def usage_csv(rows: list[UsageRow]) -> str:
    return csv_text(USAGE_CSV, [[row.day, row.key, row.tasks, row.images, row.failed, row.refused] for row in rows])


def tasks_csv(tasks: list[TaskRecord]) -> str:
    return csv_text(TASK_CSV, [[" ".join(task.image_urls) if column == "image_urls" else getattr(task, column)
                                for column in TASK_CSV] for task in tasks])


async def webhook_page(store: Store, argument: Callable[[str], str | None], *, admin: bool = False,
                       key: str | None = None) -> dict[str, Any]:
    """GET /v1/webhooks (`key`'s messages) and /admin/webhooks (?key= chooses): ?status=, ?limit=
    (50, at most 1000), newest first."""
    status = argument("status")
    if status is not None and status not in WEBHOOK_STATES:
        raise invalid("status must be one of %s" % ", ".join(WEBHOOK_STATES), param="status")
    limit = validation.count(argument("limit"), "limit", default=50, high=MAX_PAGE)
    if admin:
        key = validation.key_name(argument("key"))
    messages = await store.find_webhooks(key, status, limit + 1)
    return {"object": "list", "data": [message_object(m, admin) for m in messages[:limit]],
            "has_more": len(messages) > limit}
