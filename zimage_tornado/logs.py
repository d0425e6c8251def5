"""Logging: every line of a request carries its X-Request-ID; text or JSON lines on stderr."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from urllib.parse import urlsplit, urlunsplit

# Set by the handler for the request being served; tasks it starts inherit it. Engine tasks
# shared by many requests start from an empty context, so they carry none.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def escape(text: str) -> str:
    """Control, format and line-separator characters (\\n, U+2028, U+0085, bidi overrides, lone
    surrogates) as escapes: a value from a client or the upstream cannot start a fake log line."""
    if text.isprintable():  # the usual case, checked in C
        return text
    return "".join(c if c.isprintable() else _escaped(ord(c)) for c in text)


def _escaped(code: int) -> str:
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code


class LineFilter(logging.Filter):
    """Every record gets its request id, and its message is made one safe line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        message = record.getMessage()
        record.msg, record.args = escape(message), None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "pid": record.process,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    # What no line shows is not gathered for every record (the logging HOWTO's "Optimization"):
    # the caller's file and line (a stack walk per record), thread and multiprocessing names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LineFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def redact_url(url: str) -> str:
    """The URL without its user:password@ part, for showing and logging."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
