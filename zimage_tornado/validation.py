"""Input checks for everything a client sends; each failure is a 400 naming the param.

Nothing here talks to the upstream: a request that fails a check never leaves the gateway.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from zimage_tornado.errors import invalid
from zimage_tornado.store import day_start, utc_day

# A UUID (hex digits and '-' in its 8-4-4-4-12 shape, any case): what the upstream and the gateway
# mint. A task id is spliced into upstream paths, so nothing that could change the path ('/', '..',
# '%', '?') may get through, and an id that is no uuid is a 400 without an upstream read.
TASK_ID_RE = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


@dataclass(frozen=True)
class Limits:
    """What a generation request may ask for; built from (and defaulted by) Settings.limits."""

    max_batch_size: int
    min_size: int
    max_size: int
    size_multiple: int
    max_steps: int
    max_cfg_scale: float
    max_prompt_length: int
    ignore_image_parts: bool = False  # chat: drop image parts instead of refusing them
    answer_housekeeping: bool = True  # chat: front-ends' housekeeping and follow-ups answered without a job
    image_tools: frozenset[str] = frozenset()  # chat: function tools that make pictures (called, never drawn)


def task_id(value: str) -> str:
    if not TASK_ID_RE.fullmatch(value or ""):
        raise invalid(
            "Invalid task id: expected a uuid (8-4-4-4-12 hex digits)", param="uuid", code="invalid_task_id"
        )
    return value


MESSAGE_ID_RE = re.compile(r"msg_[A-Za-z0-9]{1,64}")


def message_id(value: str) -> str:
    if not MESSAGE_ID_RE.fullmatch(value or ""):
        raise invalid("Invalid webhook message id: expected msg_ and 1 to 64 letters or digits", param="id",
                      code="invalid_message_id")
    return value


def json_object(value: Any, param: str | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid("%s must be a JSON object" % (param or "The request body"), param=param, code="invalid_type")
    return value


def string(value: Any, param: str, *, max_length: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise invalid("%s must be a string" % param, param=param, code="invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\udcff"): valid JSON, but not text
        raise invalid("%s must be valid Unicode text" % param, param=param) from None
    if not allow_empty and not value.strip():
        raise invalid("%s must be a non-empty string" % param, param=param, code="missing_value")
    if len(value) > max_length:
        raise invalid("%s is longer than %d characters" % (param, max_length), param=param)
    return value


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid("%s must be true or false" % param, param=param, code="invalid_type")
    return value


def choice(value: Any, param: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise invalid("%s must be one of: %s" % (param, ", ".join(allowed)), param=param)
    return value


def size(value: Any, limits: Limits) -> tuple[int, int] | None:
    """OpenAI's `size`, "WIDTHxHEIGHT"; "auto" (or absent) leaves the default."""
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if match is None:
        raise invalid("size must look like 1024x1024", param="size")
    return image_side(int(match.group(1)), "size", limits), image_side(int(match.group(2)), "size", limits)


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not value.isprintable():
        raise invalid("Idempotency-Key must be 1 to 255 printable characters", param="Idempotency-Key")
    return value


def whole_number(text: str | None, digits: int) -> int | None:
    """A whole number a client wrote (a header, a query argument), or None: ASCII digits only
    ("²".isdigit() is true in Python) and at most `digits` of them (int() of thousands of digits
    raises, and costs)."""
    if text is None or not (0 < len(text) <= digits) or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def content_length(text: str) -> int | None:
    """A Content-Length someone sent (a client, an image host), or None if it is not a number;
    one of more than 18 digits is more than any limit, without int() of all of them."""
    text = text.strip()
    if len(text) > 18 and text.isascii() and text.isdigit():
        return 10 ** 18
    return whole_number(text, 18)


def picture_index(value: str) -> int:
    index = whole_number(value, 3)
    if index is None:
        raise invalid("The picture index must be a whole number from 0", param="index", code="invalid_value")
    return index


def retry_count(value: str | None) -> int:
    """The OpenAI SDK's x-stainless-retry-count: how many times it has sent this request before."""
    return whole_number(value, 3) or 0


def integer(value: Any, param: str, low: int, high: int) -> int:
    # bool is an int subclass and "4" is a string: both are type errors, not numbers.
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid("%s must be an integer" % param, param=param, code="invalid_type")
    if not low <= value <= high:
        raise invalid("%s must be between %d and %d" % (param, low, high), param=param)
    return value


def number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid("%s must be a number" % param, param=param, code="invalid_type")
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid("%s must be between %g and %g" % (param, low, high), param=param)
    return float(value)  # 7 and 7.0 are one request


def image_side(value: Any, param: str, limits: Limits) -> int:
    side = integer(value, param, limits.min_size, limits.max_size)
    if side % limits.size_multiple:
        raise invalid("%s must be a multiple of %d" % (param, limits.size_multiple), param=param)
    return side


def generation_fields(params: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """Checks the optional generation parameters present in `params`; absent ones are left out."""
    checks = {
        "negative_prompt": lambda v: string(v, "negative_prompt", max_length=limits.max_prompt_length),
        "batch_size": lambda v: integer(v, "batch_size", 1, limits.max_batch_size),
        "width": lambda v: image_side(v, "width", limits),
        "height": lambda v: image_side(v, "height", limits),
        "steps": lambda v: integer(v, "steps", 1, limits.max_steps),
        "cfg_scale": lambda v: number(v, "cfg_scale", 0, limits.max_cfg_scale),
    }
    return {name: check(params[name]) for name, check in checks.items() if params.get(name) is not None}


def prompt(value: Any, limits: Limits, param: str = "prompt") -> str:
    return string(value, param, max_length=limits.max_prompt_length, allow_empty=False).strip()


def wait_budget(timeout: str | None, wait: str | None, server_budget: float) -> float:
    """Seconds this request may wait: `?timeout=` caps the server budget, `?wait=false` means 0."""
    if wait is not None:
        flag = wait.strip().lower()
        if flag in ("false", "0", "no"):
            return 0.0
        if flag not in ("true", "1", "yes"):
            raise invalid("wait must be true or false", param="wait")
    if timeout is None:
        return server_budget
    try:
        seconds = float(timeout)
    except ValueError:
        raise invalid("timeout must be a number of seconds", param="timeout", code="invalid_type") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise invalid("timeout must be a non-negative number of seconds", param="timeout")
    return min(seconds, server_budget)


DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
KEY_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def day(value: str, param: str) -> str:
    """A UTC day as YYYY-MM-DD."""
    try:
        if not DAY_RE.fullmatch(value):
            raise ValueError
        time.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise invalid("%s must be a day, YYYY-MM-DD" % param, param=param) from None
    return value


def day_range(since: str | None, until: str | None, today: str, days: int = 30) -> tuple[str, str]:
    """`since`..`until` (both included); by default the last `days` days up to `today`."""
    end = day(until, "until") if until is not None else today
    if since is None:
        return utc_day(day_start(end) - (days - 1) * 86400), end
    start = day(since, "since")
    if start > end:
        raise invalid("since must not be after until", param="since")
    return start, end


def key_name(value: str | None) -> str | None:
    if value is not None and not KEY_NAME_RE.fullmatch(value):
        raise invalid("key must be a key name: 1 to 64 of A-Z a-z 0-9 . _ -", param="key")
    return value


def count(value: str | None, param: str, *, default: int, high: int) -> int:
    if value is None:
        return default
    number = whole_number(value, len(str(high)))
    if number is None or not 1 <= number <= high:
        raise invalid("%s must be a whole number from 1 to %d" % (param, high), param=param)
    return number
