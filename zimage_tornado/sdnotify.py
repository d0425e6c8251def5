"""systemd's notify protocol (sd_notify(3)): one datagram per message to $NOTIFY_SOCKET.

No library needed: it is a unix datagram socket and "KEY=value" lines. Outside systemd
(NOTIFY_SOCKET unset) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("zimage_tornado.sdnotify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # a socket in the abstract namespace
        self.address = address or None
        self._socket: socket.socket | None = None
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 1e6 / 2  # ping at half the timeout, as systemd advises

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """notify(READY=1, STATUS="...") sends one message; False if it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join("%s=%s" % (key, value) for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self.address)
            return True
        except OSError as e:  # systemd gone or the socket not ours: never fatal
            log.warning("sd_notify failed: %s", e)
            return False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
