"""Entry point: settings, logging, listening, workers, systemd notifications, graceful stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import deque
from typing import TYPE_CHECKING, Sequence

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from zimage_tornado import __version__, database, eventloop, keys_cli, pictures, pictures_cli, usage_cli
from zimage_tornado.config import SETTING_DEFAULTS, Settings, help_text, load_settings
from zimage_tornado.fake_upstream import FakeZImage
from zimage_tornado.logs import redact_url, setup_logging
from zimage_tornado.sdnotify import Notifier
from zimage_tornado.store import StoreUnavailable
from zimage_tornado.tenants import load_keys

if TYPE_CHECKING:
    from zimage_tornado.gateway import Gateway

log = logging.getLogger("zimage_tornado")
KEYS_CHECK_SECONDS = 2.0  # how soon an edited keys file is in force
DEMO_POLL_INTERVAL = 0.5  # --demo's poll_interval, unless one is given


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(argv) if argv is not None else sys.argv
    if argv[1:2] == ["usage"]:
        sys.exit(usage_cli.main(argv[2:]))
    if argv[1:2] == ["keys"]:
        sys.exit(keys_cli.main(argv[2:]))
    if argv[1:2] == ["pictures"]:
        sys.exit(pictures_cli.main(argv[2:]))
    if any(arg in ("--help", "-h", "-help") for arg in argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        settings = load_settings(argv)
        load_keys(settings.api_keys, settings.api_keys_file)  # a bad key file stops us here, with a message
    except (ValueError, OSError) as e:
        print("zimage-tornado: %s" % e, file=sys.stderr)
        sys.exit(2)
    setup_logging(settings.log_level, settings.log_format)
    if not settings.redis_url and settings.database != ":memory:":
        try:
            database.own(settings.database)  # held until this process (and its workers) ends
            database.prepare(settings.database)  # once, before any worker: they never race to migrate
        except database.InUse as e:
            print("zimage-tornado: %s" % e, file=sys.stderr)
            sys.exit(1)
        except (OSError, sqlite3.Error) as e:
            print("zimage-tornado: cannot open the database %s: %s" % (settings.database, e), file=sys.stderr)
            sys.exit(1)
    if settings.pictures == "keep" and (settings.pictures_dir or settings.pictures_s3_url
                                        or settings.database != ":memory:"):
        try:  # before any worker: a store that cannot be opened is said once, in one line
            pictures.open_backend(settings).close()
        except pictures.StoreNotOpened as e:
            print("zimage-tornado: %s" % e, file=sys.stderr)
            sys.exit(1)
    metrics_dir = group_metrics_dir() if settings.workers > 1 else None
    try:
        # Bound before any fork, so that every worker accepts on the same socket.
        sockets = bind_sockets(settings.port, settings.address, backlog=settings.listen_backlog)
        metrics_sockets = bind_sockets(settings.metrics_port, settings.metrics_address) if settings.metrics_port else []
    except OSError as e:  # typically the port is taken
        log.error("cannot listen on %s:%d: %s", settings.address, settings.port, e)
        sys.exit(1)
    notifier = Notifier()
    processes = settings.processes or os.cpu_count() or 1
    if settings.demo and processes != 1:
        log.warning("--demo runs one process: the simulated service keeps its tasks in that process")
        processes = 1
    if processes == 1:
        code = eventloop.run(serve(settings, sockets, notifier, metrics_sockets), settings.event_loop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # stopped cleanly: a late signal changes nothing
    else:
        code = supervise(settings, sockets, processes, notifier, metrics_sockets)
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(code)


def group_metrics_dir() -> str:
    """prometheus_client's multiprocess mode, its documented way: PROMETHEUS_MULTIPROC_DIR names
    an empty directory before the first metric exists (cli.py imports the app, and with it
    prometheus_client, only after this); every worker writes its values there, and a scrape
    adds them up. A directory of our own, or the one given, emptied of earlier runs' files."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="zimage-tornado-metrics-")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def access_line(gateway: Gateway) -> str:
    """Who may call: said at start, so that an open gateway is never one by surprise."""
    keys = gateway.keys
    if not keys:
        return "OPEN to anyone: no api_keys or api_keys_file is set (limits per client address apply)"
    return "keys required: %d in force" % len(keys.tenants)


def status_line(gateway: Gateway) -> str:
    watcher = gateway.watcher
    return "%d waiting, %d tasks polled, %d requests" % (watcher.waiting, watcher.active_polls, len(gateway.active))


async def start_demo_upstream(settings: Settings) -> Settings:
    """--demo: the fake Z-Image of the tests, on a free loopback port, as this gateway's upstream."""
    fake = FakeZImage(seconds_to_complete=settings.demo_seconds)
    demo_sockets = bind_sockets(0, "127.0.0.1")
    HTTPServer(fake.make_app()).add_sockets(demo_sockets)
    url = "http://127.0.0.1:%d" % demo_sockets[0].getsockname()[1]
    log.info("demo mode: a simulated Z-Image service on %s answers every task in %gs; no network needed",
             url, settings.demo_seconds)
    # Quick to watch: a picture shows within half a second of being ready (unless told otherwise).
    interval = DEMO_POLL_INTERVAL if settings.poll_interval == SETTING_DEFAULTS["poll_interval"] \
        else settings.poll_interval
    return dataclasses.replace(settings, upstream_url=url, poll_interval=interval)


async def serve(settings: Settings, sockets: list, notifier: Notifier, metrics_sockets: Sequence = ()) -> int:
    if settings.demo:
        settings = await start_demo_upstream(settings)
    from zimage_tornado.app import make_app, make_metrics_app  # here: after group_metrics_dir(), see there

    app = make_app(settings)
    gateway: Gateway = app.gateway  # type: ignore[attr-defined]
    try:
        await gateway.store.ready()
    except StoreUnavailable as e:
        log.error("cannot open the store: %s", e)
        await gateway.close()
        return 1
    await gateway.resume()
    # idle_connection_timeout also bounds how long a client may take to send its headers (and
    # gateway.bodies its body): a slow-loris client cannot hold a connection forever.
    server = HTTPServer(app, idle_connection_timeout=settings.idle_timeout)
    server.add_sockets(sockets)
    if metrics_sockets:
        HTTPServer(make_metrics_app(gateway), idle_connection_timeout=settings.idle_timeout).add_sockets(
            metrics_sockets)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port)
    port = sockets[0].getsockname()[1]
    log.info("zimage-tornado %s listening on http://%s:%d, upstream %s; playground at /playground (%s loop); %s",
             __version__, settings.address, port, redact_url(settings.upstream_url),
             eventloop.name(asyncio.get_running_loop()), access_line(gateway))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # Keys without a restart: SIGHUP (systemctl reload), or an edit of the keys file.
    loop.add_signal_handler(signal.SIGHUP, gateway.live_keys.reload, "SIGHUP")
    keys_watch = PeriodicCallback(gateway.live_keys.check, KEYS_CHECK_SECONDS * 1000)
    keys_watch.start()
    notifier.notify(READY=1, STATUS=status_line(gateway))
    if gateway.metrics.multiprocess:  # the others' scrapes see this worker's engine a second late at most
        PeriodicCallback(gateway.metrics.sync, 1000).start()
    heartbeat = None
    if notifier.enabled:
        interval = notifier.watchdog_interval or 5.0
        fields = {"WATCHDOG": 1} if notifier.watchdog_interval else {}
        def beat() -> None:
            notifier.notify(**fields, STATUS=status_line(gateway))
        heartbeat = PeriodicCallback(beat, interval * 1000)
        heartbeat.start()
    await stopping.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the graceful stop short
        loop.add_signal_handler(signum, log.info, "already shutting down")
    if heartbeat is not None:
        heartbeat.stop()
    keys_watch.stop()
    return await shutdown(server, gateway, notifier, settings.shutdown_timeout)


async def shutdown(server: HTTPServer, gateway: Gateway, notifier: Notifier, timeout: float) -> int:
    """Stop accepting, answer every waiting client with its task's current status, let requests in
    flight (submits included: an accepted job is never lost) finish, then close. Bounded by
    `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    notifier.notify(STOPPING=1, STATUS="shutting down")
    log.info("shutting down: %s", status_line(gateway))
    gateway.shutting_down = True
    server.stop()
    await gateway.watcher.close()
    while gateway.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if gateway.active:
        log.warning("%d requests still running after shutdown_timeout; closing them", len(gateway.active))
    try:
        await asyncio.wait_for(server.close_all_connections(), max(0.1, deadline - loop.time()))
    except asyncio.TimeoutError:
        log.warning("connections still open after shutdown_timeout")
    await gateway.close()
    log.info("stopped")
    return 0


def supervise(settings: Settings, sockets: list, processes: int, notifier: Notifier,
              metrics_sockets: Sequence = ()) -> int:
    """Forks `processes` workers on the shared sockets, restarts one that dies, passes SIGTERM
    and SIGINT on to all of them, and exits when they have all stopped."""
    children: dict[int, int] = {}  # pid -> worker number
    starts: deque[float] = deque(maxlen=10)
    stopping: list[float] = []

    def spawn(number: int) -> None:
        starts.append(time.monotonic())
        pid = os.fork()
        if pid == 0:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                # only the main process notifies systemd
                code = eventloop.run(serve(settings, sockets, Notifier({}), metrics_sockets), settings.event_loop)
            except BaseException:  # noqa: BLE001 - a worker reports its end and exits, whatever it was
                log.exception("worker %d crashed", number)
            finally:
                os._exit(code)
        children[pid] = number

    def forward(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            notifier.notify(STOPPING=1, STATUS="shutting down %d workers" % len(children))
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def reload(signum: int, frame: object) -> None:
        for pid in list(children):  # every worker reads the keys again
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for number in range(processes):
        spawn(number)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    log.info("started %d worker processes", processes)
    notifier.notify(READY=1, STATUS="%d workers" % processes)
    next_ping = 0.0
    exit_code = 0
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            number = children.pop(pid)
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(pid)  # its live gauges go; its counters stay counted
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                exit_code = exit_code or int(code != 0)
            elif len(starts) == starts.maxlen and time.monotonic() - starts[0] < 10:
                log.error("workers keep dying (last exit %s); stopping", code)
                forward(signal.SIGTERM, None)
                exit_code = 1
            else:
                log.error("worker %d (pid %d) exited with %s; starting another", number, pid, code)
                spawn(number)
            continue
        now = time.monotonic()
        if stopping and now - stopping[0] > settings.shutdown_timeout + 5:
            for child in children:
                os.kill(child, signal.SIGKILL)  # a stuck worker: systemd would do the same
        if notifier.enabled and now >= next_ping:
            fields = {"WATCHDOG": 1} if notifier.watchdog_interval else {}
            notifier.notify(**fields, STATUS="%d workers" % len(children))
            next_ping = now + (notifier.watchdog_interval or 5.0)
        time.sleep(0.05)
    return exit_code
