"""Shared pieces of the benchmarks: start the fake upstream and the proxy as real processes on
127.0.0.1, a minimal HTTP/1.1 client on raw sockets, RSS readings, percentiles, tables.

Benchmarks only ever talk to 127.0.0.1 and stop by themselves."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
SCRATCH = tempfile.TemporaryDirectory(prefix="zimage-bench-")  # databases and key files; gone at exit


def raise_fd_limit() -> int:
    """Children inherit it: 10,000 waiters need 10,000 sockets on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited with %s" % proc.returncode)
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d" % port)


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(the proxy's CPUs, everything else's): the system under test gets a core of its own, so that
    the load generator and the fake upstream do not steal its time. None on a one-core machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


@contextmanager
def started(args: Sequence[str], port: int, cpus: set[int] | None = None) -> Iterator[subprocess.Popen]:
    # Their logs would drown the table: a benchmark reports what its clients saw.
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def fake_upstream(port: int, **options: Any) -> list[str]:
    args = ["-m", "zimage_tornado.fake_upstream", "--port", str(port)]
    for name, value in options.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


def proxy(port: int, upstream_port: int, **settings: Any) -> list[str]:
    """A gateway on its default (file-backed) store, in a temporary directory of this run."""
    settings.setdefault("database", os.path.join(SCRATCH.name, "gateway-%d.sqlite3" % port))
    # Every client of a benchmark is 127.0.0.1: a per-address read limit would measure itself.
    settings.setdefault("ip_reads_per_minute", 0)
    args = ["-m", "zimage_tornado", "--port=%d" % port, "--upstream-url=http://%s:%d" % (HOST, upstream_port),
            "--log-level=warning"]
    return args + ["--%s=%s" % (name, value) for name, value in settings.items()]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s for pid %d" % (field, pid))


class Connection:
    """One keep-alive HTTP/1.1 connection; enough HTTP for JSON requests and answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection(HOST, port))

    async def request(self, method: str, path: str, body: Any = None, close: bool = False,
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, data = await self.exchange(method, path, body, close, headers)
        return status, json.loads(data) if data else None

    async def exchange(self, method: str, path: str, body: Any = None, close: bool = False,
                       headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request and its answer's status and raw body."""
        payload = b"" if body is None else json.dumps(body).encode()
        extra = "".join("%s: %s\r\n" % item for item in (headers or {}).items())
        head = "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n" % (
            method, path, HOST, len(payload), "Connection: close\r\n" if close else "", extra)
        self.writer.write(head.encode() + payload)
        status_line = await self.reader.readuntil(b"\r\n")
        length = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])
