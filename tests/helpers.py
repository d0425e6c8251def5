"""Small helpers shared by tests and kept in one place."""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import time
from typing import Any, Callable

from tornado.iostream import IOStream
from tornado.tcpclient import TCPClient


async def eventually(condition: Callable[[], Any], timeout: float = 3.0, interval: float = 0.01,
                     message: Callable[[], str] | str = "condition not reached in time") -> Any:
    """Polls `condition` (a function, plain or async) until it returns something true; fails
    the test with `message` after `timeout` seconds. Returns what the condition returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, message() if callable(message) else message
        await asyncio.sleep(interval)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def connect(url: str) -> IOStream:
    """A raw TCP connection to a gateway, for requests an HTTP client would not send."""
    return await TCPClient().connect("127.0.0.1", port_of(url))


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Blocks until a started process accepts connections on `port` (for synchronous tests)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the process exited with %s" % proc.returncode
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "nothing listens on port %d" % port
            time.sleep(0.05)


async def exchange(url: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Sends raw bytes to a gateway and reads its answer until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def fill(disk):
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing it has nothing left to fail on
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    try:  # the last partial block too
        with open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass
    return filler


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (VmRSS), or its peak (VmHWM), in KiB, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for %d" % (field, pid))

