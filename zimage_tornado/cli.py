"""Entry point: settings, logging, the server, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Sequence

from tornado.httpserver import HTTPServer

from zimage_tornado import __version__
from zimage_tornado.app import make_app
from zimage_tornado.config import Settings, load_settings

log = logging.getLogger("zimage_tornado")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(settings: Settings) -> None:
    app = make_app(settings)
    server = HTTPServer(app)
    server.listen(settings.port, settings.address, backlog=settings.backlog)
    log.info("zimage-tornado %s listening on http://%s:%d, upstream %s",
             __version__, settings.address, settings.port, settings.upstream_url)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down: no new connections; answering waiting clients with their current status")
    server.stop()
    await app.gateway.close()
    await server.close_all_connections()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = load_settings(list(argv) if argv is not None else sys.argv)
    except ValueError as e:
        print("zimage-tornado: %s" % e, file=sys.stderr)
        sys.exit(2)
    setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except OSError as e:  # typically the port is taken
        log.error("cannot serve on %s:%d: %s", settings.address, settings.port, e)
        sys.exit(1)
