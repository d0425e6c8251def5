"""The asyncio event loop the gateway runs on (`event_loop`): uvloop, a drop-in loop written on
libuv, spends less CPU per request than asyncio's own (bench/submit.py); `auto` uses it when it
is installed (requirements.txt installs it) and asyncio's loop otherwise, `asyncio` forces the
standard loop. Tornado runs on either unchanged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine, TypeVar

log = logging.getLogger("zimage_tornado")
T = TypeVar("T")
CHOICES = ("auto", "asyncio", "uvloop")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop to make, or None for asyncio's default. Raises ValueError when `uvloop` is asked
    for and is not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("event_loop = uvloop, but uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
