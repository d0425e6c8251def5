"""`zimage`: pictures from a prompt, through a zimage-tornado gateway, in a terminal.

    zimage "a lighthouse at dusk" -n 2 --size 1024x768 -o pictures/
    zimage --no-wait "a lighthouse"        # prints the task uuid only
    zimage --wait 3f0c...                  # fetches an earlier task
    zimage --health

It submits with a fresh Idempotency-Key (a retried command never pays twice), follows the
task on the gateway's own stream (progress bar on stderr when it is a terminal, a line per
change otherwise), downloads the pictures as <uuid>_<i>.png and prints their paths.
Exit status: 0 pictures saved; 1 the task failed or timed out (the message names its uuid);
2 bad arguments or a 4xx; 3 the gateway is unreachable or answered 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time
import uuid as uuidlib
from typing import Any, Sequence

from tornado.httpclient import HTTPClientError, HTTPResponse
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

from zimage_tornado.validation import TASK_ID_RE

EXAMPLE_PROMPT = "一只站在月球上的猫，超现实主义"  # a cat standing on the moon, surreal: the classic first picture
OK, TASK_FAILED, CLIENT_ERROR, GATEWAY_ERROR = 0, 1, 2, 3
MAX_IMAGE_BYTES = 64 * 1024 * 1024
SIZE_RE = re.compile(r"(\d{2,5})[xX](\d{2,5})")


class Failure(Exception):
    """Ends the command with a one-line message and an exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TimedOut(Failure):
    """The gateway did not answer within the time given."""


# The gateway's names of what the command's flags set: its errors are told in the flags' words.
FLAGS = {"batch_size": "-n", "width": "--size", "height": "--size", "steps": "--steps", "cfg_scale": "--cfg-scale",
         "negative_prompt": "--negative", "model": "--model"}


def writable(folder: str) -> None:
    """The output folder exists (made if need be) and takes a file, before anything is paid for."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".zimage-%s.probe" % uuidlib.uuid4().hex)
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise Failure(CLIENT_ERROR, "cannot write pictures to %s: %s (nothing was submitted)"
                      % (folder, e.strerror or e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zimage", description="Pictures from a prompt, through a zimage-tornado gateway.")
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("--example", action="store_true", help="draw the classic example (a cat on the moon)")
    p.add_argument("-n", type=int, default=1, help="pictures (batch_size)")
    p.add_argument("--size", help="WIDTHxHEIGHT, e.g. 1024x768")
    p.add_argument("--model", default="zimage-turbo")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("-o", "--output", default=".", help="directory for the pictures (default: here)")
    p.add_argument("--wait", metavar="UUID", help="fetch an earlier task instead of submitting")
    p.add_argument("--no-wait", action="store_true", help="submit, print the task uuid, and stop")
    p.add_argument("--json", action="store_true", help="print the gateway's answer instead of the paths")
    p.add_argument("--health", action="store_true", help="check /health and /health/ready")
    p.add_argument("--url", default=os.environ.get("ZIMAGE_URL", "http://localhost:8000"),
                   help="the gateway (default: $ZIMAGE_URL or http://localhost:8000)")
    p.add_argument("--api-key", default=os.environ.get("ZIMAGE_API_KEY", "zimage-free"),
                   help="sent as Authorization: Bearer (default: $ZIMAGE_API_KEY)")
    p.add_argument("--idempotency-key", default=None, help="default: a fresh one for this command")
    p.add_argument("--timeout", type=float, default=330, help="seconds to wait for the pictures")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    options = parser()
    args = options.parse_args(argv)  # bad arguments: argparse says so and exits 2
    submits = not (args.wait or args.health)
    if submits and args.prompt is None and not args.example:  # never a paid job nobody asked for
        options.print_usage(sys.stderr)
        print("zimage: give a prompt (or --example)", file=sys.stderr)
        sys.exit(CLIENT_ERROR)
    if submits and args.prompt is not None and not args.prompt.strip():
        print("zimage: the prompt is empty", file=sys.stderr)
        sys.exit(CLIENT_ERROR)
    try:
        sys.exit(asyncio.run(Client(args).run()))
    except Failure as e:
        print("zimage: %s" % e, file=sys.stderr)
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print("zimage: unexpected error: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        sys.exit(GATEWAY_ERROR)


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # The base URL OpenAI users know (http://host:8000/v1) works as well as the gateway's own.
        self.url = re.sub(r"/v1/?$", "", args.url.rstrip("/"))
        self.headers = {"Authorization": "Bearer %s" % args.api_key, "Content-Type": "application/json"}

    async def run(self) -> int:
        self.http = SimpleAsyncHTTPClient(force_instance=True, max_body_size=MAX_IMAGE_BYTES)
        try:
            if self.args.health:
                return await self.health()
            if self.args.wait:
                uuid = self.args.wait.strip()
                if not TASK_ID_RE.fullmatch(uuid):
                    raise Failure(CLIENT_ERROR, "not a task uuid: %r" % uuid[:80])
                writable(self.args.output)
                answer = await self.fetch_task(uuid)
            elif self.args.no_wait:
                print(await self.submit())
                return OK
            else:
                writable(self.args.output)
                answer = await self.generate()
            return await self.save(answer)
        finally:
            self.http.close()

    # -- talking to the gateway -----------------------------------------------------------------

    async def call(self, path: str, method: str = "GET", body: Any = None, timeout: float = 30,
                   headers: dict[str, str] | None = None, **kwargs: Any) -> HTTPResponse:
        try:
            return await self.http.fetch(self.url + path, method=method, headers=headers or self.headers,
                                         raise_error=False,
                                         body=None if body is None else json.dumps(body), request_timeout=timeout,
                                         connect_timeout=10, **kwargs)
        except HTTPTimeoutError:
            raise TimedOut(GATEWAY_ERROR, "the gateway at %s did not answer within %gs" % (self.url, timeout)) \
                from None
        except HTTPClientError as e:  # a failure (599) is raised even with raise_error=False
            raise Failure(GATEWAY_ERROR, "the gateway at %s did not answer: %s" % (self.url, e)) from None
        except OSError as e:
            raise Failure(GATEWAY_ERROR, "cannot reach the gateway at %s: %s" % (self.url, e.strerror or e)) from None

    @staticmethod
    def refused(status: int, body: bytes, uuid: str | None = None) -> Failure:
        """A Failure for an error answer: its envelope's message, and the exit status it means."""
        try:
            error = json.loads(body)["error"]
            message, code, param = str(error["message"]), error.get("code"), error.get("param")
        except (ValueError, KeyError, TypeError):
            message, code, param = "HTTP %d" % status, None, None
        if param in FLAGS:  # said in the words the user typed
            message = "%s: %s" % (FLAGS[param], message.replace(param, FLAGS[param]))
        if uuid and code in ("task_failed", "timeout", "upstream_unavailable"):
            return Failure(TASK_FAILED, "%s (fetch it later: zimage --wait %s)" % (message, uuid))
        if status == 401:
            message += " (give the gateway's key with --api-key or $ZIMAGE_API_KEY)"
        return Failure(CLIENT_ERROR if status < 500 else GATEWAY_ERROR, message)

    def request_body(self, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.args.model, "prompt": self.args.prompt or EXAMPLE_PROMPT,
                                "batch_size": self.args.n, **extra}
        if self.args.size:
            match = SIZE_RE.fullmatch(self.args.size)
            if not match:
                raise Failure(CLIENT_ERROR, "--size must look like 1024x768")
            body["width"], body["height"] = int(match.group(1)), int(match.group(2))
        for name, value in (("negative_prompt", self.args.negative), ("steps", self.args.steps),
                            ("cfg_scale", self.args.cfg_scale)):
            if value is not None:
                body[name] = value
        return body

    @property
    def idempotency(self) -> dict[str, str]:
        if self.args.idempotency_key is None:
            self.args.idempotency_key = str(uuidlib.uuid4())  # this command's: a retry of it never pays twice
        return {"Idempotency-Key": self.args.idempotency_key}

    async def submit(self) -> str:
        response = await self.call("/v1/chat/completions", "POST", self.request_body(wait=False),
                                   headers={**self.headers, **self.idempotency})
        if response.code != 200:
            raise self.refused(response.code, response.body)
        return str(json.loads(response.body)["choices"][0]["message"]["task_uuid"])

    async def generate(self) -> dict[str, Any]:
        """Submits and follows the task on the gateway's stream; returns its final answer."""
        progress = Progress()
        events = EventReader()
        try:
            response = await self.call("/v1/chat/completions", "POST", self.request_body(stream=True, wait=True),
                                       timeout=self.args.timeout, headers={**self.headers, **self.idempotency},
                                       streaming_callback=lambda chunk: events.feed(chunk, progress))
        except TimedOut:
            progress.close()
            if events.uuid is None:
                raise
            raise Failure(TASK_FAILED, "task %s is not finished after %gs; it goes on: fetch it later with "
                                       "zimage --wait %s" % (events.uuid, self.args.timeout, events.uuid)) from None
        if response.code != 200:  # refused before the stream began (the body was streamed to us)
            raise self.refused(response.code, events.raw())
        progress.close()
        if events.error is not None:
            raise self.refused(502, json.dumps(events.error).encode(), events.uuid)
        if events.uuid is None:
            raise Failure(GATEWAY_ERROR, "the gateway's stream ended without a task")
        return await self.fetch_task(events.uuid)

    async def fetch_task(self, uuid: str) -> dict[str, Any]:
        """The task's answer from the long-poll (finished tasks come from the gateway's cache)."""
        response = await self.call("/v1/images/%s?timeout=%g" % (uuid, self.args.timeout),
                                   timeout=self.args.timeout + 30)
        if response.code != 200:
            raise self.refused(response.code, response.body, uuid)
        return dict(json.loads(response.body))

    async def health(self) -> int:
        for path in ("/health", "/health/ready"):
            response = await self.call(path)
            print("%s: %d %s" % (path, response.code, response.body.decode("utf-8", "replace").strip()))
            if response.code != 200:
                return GATEWAY_ERROR
        return OK

    # -- the pictures ---------------------------------------------------------------------------

    async def save(self, answer: dict[str, Any]) -> int:
        uuid = str(answer["uuid"])
        os.makedirs(self.args.output, exist_ok=True)
        paths = []
        for i, url in enumerate(answer.get("image_urls", [])):
            if not str(url).lower().startswith(("http://", "https://")):
                continue
            try:
                image = await self.http.fetch(url, request_timeout=120, connect_timeout=10)
            except (HTTPClientError, OSError) as e:
                raise Failure(GATEWAY_ERROR, "picture %d of task %s could not be downloaded: %s" % (i + 1, uuid, e)) \
                    from None
            path = os.path.join(self.args.output, "%s_%d.png" % (uuid, i))
            with open(path + ".part", "wb") as f:
                f.write(image.body)
            os.replace(path + ".part", path)  # never a half-written picture under its name
            paths.append(path)
        if not paths:
            raise Failure(TASK_FAILED, "task %s has no pictures to download" % uuid)
        print(json.dumps(answer, ensure_ascii=False) if self.args.json else "\n".join(paths))
        return OK


class EventReader:
    """Reads the gateway's Server-Sent Events as they arrive: the task's uuid, its progress
    (each chunk's `task_status`), and an error event if the task failed."""

    def __init__(self) -> None:
        self.buffer = b""
        self.seen: list[bytes] = []
        self.uuid: str | None = None
        self.error: dict[str, Any] | None = None

    def feed(self, chunk: bytes, progress: Progress) -> None:
        self.seen.append(chunk)
        self.buffer += chunk
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: {"):
                    self.data(json.loads(line[6:]), progress)

    def data(self, data: dict[str, Any], progress: Progress) -> None:
        if "error" in data:
            self.error = data
            return
        self.uuid = data.get("task_uuid") or self.uuid
        status = data.get("task_status")
        if isinstance(status, dict):
            progress.show(self.uuid, status.get("status"), status.get("progress"), status.get("queue_position"))

    def raw(self) -> bytes:
        return b"".join(self.seen)


class Progress:
    """A progress bar (tqdm) on a terminal; a plain line per change otherwise."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.last: tuple[Any, ...] | None = None
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            # A terminal that reports no size (0 x 0, as a new pty does) would get no bar at all
            # from tqdm: the size comes from shutil, which falls back to 80 x 20 then.
            size = shutil.get_terminal_size((80, 20))
            self.bar = tqdm(total=100, file=sys.stderr, desc="submitting", leave=True, ncols=min(size.columns, 100),
                            nrows=size.lines, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")

    def show(self, uuid: str | None, status: Any, percent: Any, queue: Any) -> None:
        state = (status, percent, queue)
        if state == self.last:
            return
        self.last = state
        where = "%s, queue position %s" % (status, queue) if queue is not None and status == "pending" else status
        if self.bar is not None:
            self.bar.set_description_str(str(where))
            if isinstance(percent, (int, float)):
                self.bar.n = max(0.0, min(100.0, float(percent)))
            self.bar.refresh()
        else:
            shown = "" if percent is None else " %s%%" % percent
            print("task %s: %s%s (%.1fs)" % (uuid, where, shown, time.monotonic() - self.started), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = 100
            self.bar.set_description_str("completed")
            self.bar.close()
