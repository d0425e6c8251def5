"""PooledHTTPClient: the upstream's API calls over kept-alive HTTP/1.1 connections.

An AsyncHTTPClient (same fetch(), same HTTPResponse) for small JSON calls to one service: it
parses with Tornado's own HTTP/1.1 code (HTTP1Connection: chunked and length-delimited bodies,
header and body limits) and keeps each connection open for the next call. Against pycurl it
saves the per-request curl setup, header callbacks and socket re-registration (bench/submit.py,
docs/benchmarks.md), and it sends nothing twice by construction: a POST is written once, on one
connection, and any failure after its first byte left is reported, never retried.

Not for downloads: no streaming, redirects or proxies (images.py has its own client).
"""

from __future__ import annotations

import _socket
import asyncio
import base64
import io
import socket
import ssl
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPMessageDelegate, RequestStartLine, ResponseStartLine
from tornado.iostream import IOStream, StreamClosedError
from tornado.simple_httpclient import HTTPTimeoutError
from tornado.tcpclient import TCPClient

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024  # an API answer is a few KiB; a hostile upstream cannot grow memory past this
IDLE_SECONDS = 30.0  # a kept connection older than this is closed rather than reused

Origin = tuple[str, str, int]


class NeverSent(HTTPClientError):
    """The call failed before any byte of it left (queueing, resolving, connecting, TLS): a POST
    that fails this way certainly made no job upstream."""

    never_sent = True

    def __init__(self, message: str) -> None:
        super().__init__(599, message)


class NeverSentTimeout(HTTPTimeoutError):
    never_sent = True


class _Answer(HTTPMessageDelegate):
    """Collects one response."""

    def __init__(self) -> None:
        self.start_line: ResponseStartLine | None = None
        self.headers: HTTPHeaders | None = None
        self.chunks: list[bytes] = []
        self.complete = False

    def headers_received(self, start_line: Any, headers: HTTPHeaders) -> None:
        self.start_line = start_line
        self.headers = headers

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.complete = True


def _quiet(stream: IOStream) -> bool:
    """A kept connection can be reused: the server has not closed it and has sent nothing since
    its last answer (bytes now would be an answer to nobody, or a close in progress)."""
    if stream.closed() or stream.socket is None:
        return False
    try:
        # the raw socket, below TLS: any byte at all (even a TLS alert) means "do not reuse"
        _socket.socket.recv(stream.socket, 1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # closed (b"") or unasked-for bytes


class PooledHTTPClient(AsyncHTTPClient):
    def initialize(self, defaults: dict[str, Any] | None = None, max_clients: int = 10,
                   max_body_size: int = MAX_BODY_BYTES, idle_seconds: float = IDLE_SECONDS) -> None:
        super().initialize(defaults=defaults)
        self.max_clients = max_clients
        self.idle_seconds = idle_seconds
        self._busy = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._idle: dict[Origin, deque[tuple[IOStream, float]]] = {}  # the newest last
        self._tcp = TCPClient()
        self._tls: dict[str | None, ssl.SSLContext] = {}
        self.max_body_size = max_body_size
        self._params = HTTP1ConnectionParameters(max_header_size=MAX_HEADER_BYTES, max_body_size=max_body_size)
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    def close(self) -> None:
        """Closes the kept connections; calls in flight end as they would (each within its
        timeout) and their connections are closed, not kept."""
        self._closed = True
        for kept in self._idle.values():
            for stream, _ in kept:
                stream.close()
        self._idle.clear()
        self._tcp.close()
        super().close()

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        if request.streaming_callback or request.header_callback or request.proxy_host:
            raise ValueError("PooledHTTPClient makes API calls only: no streaming, header callbacks or proxies")
        task = asyncio.ensure_future(self._fetch(request, callback))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _fetch(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        started_wall, started = time.time(), time.monotonic()
        timeout = float(request.request_timeout or 0)
        try:
            response = await self._exchange(request, started + timeout if timeout else None)
        except Exception as e:  # noqa: BLE001 - every failure is this call's answer: no waiter left hanging
            error: BaseException = e.real_error if isinstance(e, StreamClosedError) and e.real_error else e
            response = HTTPResponse(request, 599, error=error, request_time=time.monotonic() - started,
                                    start_time=started_wall)
        else:
            response.request_time = time.monotonic() - started
            response.start_time = started_wall
        callback(response)

    async def _exchange(self, request: HTTPRequest, deadline: float | None) -> HTTPResponse:
        url = urlsplit(request.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise NeverSent("Unsupported URL %s://" % url.scheme)
        origin: Origin = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))
        await self._slot(deadline)
        try:
            for attempt in (1, 2):
                stream, reused = self._kept(origin) if attempt == 1 else (None, False)
                if stream is None:
                    stream = await self._connect(origin, request, deadline)
                try:
                    answer = await self._send(stream, request, url, deadline)
                except BaseException:
                    stream.close()  # whatever went wrong, this connection is not used again
                    raise
                if answer is not None:
                    return self._response(request, answer, origin, stream)
                stream.close()
                # The connection died before any byte of an answer. A reused one may have been
                # closed by the server as we wrote: a GET is asked again once on a new one; a
                # POST is not (it may have arrived), nor anything on a fresh connection.
                if not reused or request.method != "GET" or attempt == 2:
                    raise HTTPClientError(599, "The connection closed before an answer (%s)"
                                          % (stream.error or "closed by the server"))
            raise AssertionError("unreachable")
        finally:
            self._release()

    async def _slot(self, deadline: float | None) -> None:
        if self._busy < self.max_clients:
            self._busy += 1
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append(waiter)

        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(NeverSentTimeout("Timeout in request queue"))

        timer = None if deadline is None else loop.call_later(deadline - time.monotonic(), expire)
        try:
            await waiter  # _release() hands its slot over, _busy unchanged
        finally:
            if timer is not None:
                timer.cancel()

    def _release(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._busy -= 1

    def _kept(self, origin: Origin) -> tuple[IOStream | None, bool]:
        kept = self._idle.get(origin)
        now = time.monotonic()
        while kept:
            stream, since = kept.pop()
            if now - since < self.idle_seconds and _quiet(stream):
                return stream, True
            stream.close()
        return None, False

    async def _connect(self, origin: Origin, request: HTTPRequest, deadline: float | None) -> IOStream:
        scheme, host, port = origin
        timeout = float(request.connect_timeout or 0) or None
        if deadline is not None:  # the call's own deadline comes first if it is nearer
            left = max(0.0, deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        try:
            tls = self._context(request) if scheme == "https" else None
            stream = await self._tcp.connect(host, port, ssl_options=tls, timeout=timeout,
                                             max_buffer_size=self.max_body_size + MAX_HEADER_BYTES)
        except TimeoutError as e:  # tornado.util.TimeoutError is asyncio's, which is this one
            raise NeverSentTimeout("Timeout while connecting") from e
        except StreamClosedError as e:
            if isinstance(e.real_error, ssl.SSLError):  # a TLS failure, as ssl reports it
                raise e.real_error from e
            raise NeverSent("Could not connect: %s" % (e.real_error or e)) from e
        except ssl.SSLError:
            raise
        except OSError as e:  # refused, unreachable, no such host
            raise NeverSent("Could not connect: %s" % e) from e
        stream.set_nodelay(True)  # a request is one small write: Nagle would hold it back
        return stream

    def _context(self, request: HTTPRequest) -> ssl.SSLContext:
        context = self._tls.get(request.ca_certs)
        if context is None:
            context = self._tls[request.ca_certs] = ssl.create_default_context(cafile=request.ca_certs)
        return context

    async def _send(self, stream: IOStream, request: HTTPRequest, url: Any, deadline: float | None) -> _Answer | None:
        """Writes the request once and reads its answer; None if the connection died before any
        byte of an answer. Past the deadline the connection is closed under the call."""
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            stream.close()

        timer = None if deadline is None else asyncio.get_running_loop().call_later(deadline - time.monotonic(), expire)
        try:
            connection = HTTP1Connection(stream, True, self._params)
            headers = HTTPHeaders(request.headers)
            if "Host" not in headers:
                headers["Host"] = url.netloc.rpartition("@")[2]
            if url.username is not None and "Authorization" not in headers:  # user:password@ in the URL
                secret = "%s:%s" % (unquote(url.username), unquote(url.password or ""))
                headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode("ascii")
            body = request.body if request.body is not None else b""
            if request.body is not None or request.method in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            path = (url.path or "/") + ("?" + url.query if url.query else "")
            connection.write_headers(RequestStartLine(request.method, path, "HTTP/1.1"), headers, body or None)
            connection.finish()
            answer = _Answer()
            try:
                await connection.read_response(answer)
            except StreamClosedError:
                pass  # judged below: by the deadline, and by how much of an answer had come
        finally:
            if timer is not None:
                timer.cancel()
        if timed_out:
            raise HTTPTimeoutError("Timeout during request")
        if answer.complete:
            return answer
        if answer.start_line is None:
            return None
        raise HTTPClientError(599, "The answer was cut off, malformed or larger than %d bytes"
                              % self.max_body_size)

    def _response(self, request: HTTPRequest, answer: _Answer, origin: Origin, stream: IOStream) -> HTTPResponse:
        assert answer.start_line is not None and answer.headers is not None
        headers = answer.headers
        delimited = "Content-Length" in headers or headers.get("Transfer-Encoding", "").lower() == "chunked"
        closing = "close" in headers.get("Connection", "").lower()
        if (not self._closed and answer.start_line.version == "HTTP/1.1" and delimited and not closing
                and not stream.closed()
                and not getattr(stream, "_read_buffer_size", 1)):  # nothing read past this answer
            kept = self._idle.setdefault(origin, deque())
            now = time.monotonic()
            while kept and (len(kept) >= self.max_clients or now - kept[0][1] >= self.idle_seconds):
                kept.popleft()[0].close()  # the oldest: past its idle time, or one too many
            kept.append((stream, now))
        else:
            stream.close()
        return HTTPResponse(request, answer.start_line.code, reason=answer.start_line.reason, headers=headers,
                            buffer=io.BytesIO(b"".join(answer.chunks)), effective_url=request.url)
