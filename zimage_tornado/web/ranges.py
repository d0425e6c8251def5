"""HTTP `Range` of a picture download (RFC 9110): one `bytes=` range, or the whole picture."""

from __future__ import annotations

import re

from zimage_tornado.errors import ApiError

RANGE_RE = re.compile(r"^bytes=(\d{0,15})-(\d{0,15})$")


def requested(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of the one range asked for, None for the whole picture (no header,
    or several ranges: answered whole, as RFC 9110 allows); 416 for a range past the end."""
    if header is None:
        return None
    match = RANGE_RE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None  # not one bytes range: the whole picture
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= end:
        raise ApiError(416, "The range asked for is not within the picture's %d bytes" % size,
                       param="Range", code="range_not_satisfiable", headers={"Content-Range": "bytes */%d" % size})
    return start, end
