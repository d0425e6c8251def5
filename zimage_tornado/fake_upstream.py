"""A real HTTP imitation of the Z-Image service, for tests and benchmarks.

It follows UPSTREAM.md: tasks go pending -> processing -> completed (or failed), results come
as `resultUrls`, a single `resultUrl` or a JSON-encoded array, and images are real PNGs drawn
from the prompt. Fault switches make any call misbehave; counters record what it received.

Standalone: `python -m zimage_tornado.fake_upstream --port 9100 --seconds-to-complete 3`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
import time
import uuid as uuidlib
import zlib
from collections import Counter, defaultdict, deque
from functools import lru_cache
from typing import Any

from tornado.web import Application, RequestHandler

FAULTS = {
    "500": "HTTP 500 with a success:false JSON body",
    "502": "HTTP 502 with an HTML body (what a front proxy sends)",
    "503": "HTTP 503 with an HTML body",
    "429": "HTTP 429, Retry-After and a success:false body",
    "400": "HTTP 400 with a success:false body",
    "404": "HTTP 404 with a success:false body",
    "false200": "HTTP 200 with success:false",
    "garbage": "HTTP 200 with a body that is not JSON",
    "no_uuid": "HTTP 200, success:true, but no uuid / no task object",
    "unknown_status": "a task read answering taskStatus 'mystery'",
    "hang": "answer normally, but only after hang_seconds",
    "challenge": "HTTP 403 with a Cloudflare browser check (cf-mitigated: challenge, 'Just a moment...')",
    "reset": "close the connection without answering",
    "huge_answer": "HTTP 200 with a 9 MiB JSON body (an API answer past any reasonable size)",
    "endless": "an image that never stops coming (chunks until the client hangs up, or 30 s)",
    "huge_length": "an image announcing a Content-Length of 10 GB",
    "wild_length": "an image whose Content-Length is 5,000 digits long (written on the raw connection)",
}


# What a soak run's random faults are drawn from: the transient kinds a real service shows.
RANDOM_FAULTS = ("500", "502", "503", "429", "garbage", "reset", "false200", "hang")


class FakeZImage:
    def __init__(self, *, reads_to_complete: int = 2, seconds_to_complete: float | None = None,
                 outcome: str = "complete", result_style: str = "list", uuid_at: str = "data",
                 hang_seconds: float = 5.0, retry_after: str = "1", completion_spread: float = 0.0,
                 fault_rate: float = 0.0, seed: int = 0) -> None:
        self.reads_to_complete = reads_to_complete
        self.seconds_to_complete = seconds_to_complete  # if set, completion goes by time, not reads
        self.completion_spread = completion_spread  # with time: each task takes up to this much longer
        self.outcome = outcome  # "complete", "fail" or "never" for new tasks
        self.result_style = result_style  # "list", "single" or "json_string"
        self.uuid_at = uuid_at  # "data" or "task"
        self.hang_seconds = hang_seconds
        self.retry_after = retry_after
        self.tasks: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()  # by endpoint: generate, task, image
        self.task_reads: Counter[str] = Counter()  # by task uuid
        self.read_times: defaultdict[str, list[float]] = defaultdict(list)
        self.generate_bodies: list[Any] = []
        self.result_urls: dict[str, list[str]] = {}  # prompt -> the result URLs its tasks list
        self.error_message = "The model could not draw this prompt"  # a failed task's errorMessage
        self.image_bytes_sent = 0
        self.images_served = 0
        self.image_override: bytes | None = None  # every picture is these bytes (a large one, say)
        self.links_live_for: float | None = None  # a task's pictures are gone this many seconds after its submit
        self.noise_side = 0  # every picture random noise of this side (large, incompressible, distinct)
        self.session_cookie: str | None = None  # if set, API calls without this Cookie meet a browser check
        # The service as its later clients see it: camelCase bodies, a moderation step, batches
        self.protocol = "flat"  # "camel": a submit without modelType is refused (400)
        self.moderation = False  # a submit needs a promptModerationToken from /api/prompt-moderation/check
        self.banned_words: set[str] = {"forbidden"}  # moderation refuses prompts with these
        self.batches = False  # camel submits of several pictures answer a parentTaskUuid (batch-status)
        self.parents: dict[str, list[str]] = {}  # parent uuid -> its single-picture tasks
        self.tokens: set[str] = set()
        self.redirects = 0
        self.request_headers: list[dict[str, str]] = []  # of every call, in order
        self.peers: set[Any] = set()  # the client addresses (ip, port) calls came from: one per connection
        self._faults: dict[str, deque[str]] = defaultdict(deque)
        self._always: dict[str, str] = {}
        self.fault_rate = fault_rate  # share of calls that fail at random (soak tests)
        self._random = random.Random(seed)

    # -- switches ---------------------------------------------------------------------------

    def inject(self, endpoint: str, *faults: str) -> None:
        """The next calls to `endpoint` ("generate", "task", "image") fail, one fault each."""
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError("unknown fault %r" % fault)
        self._faults[endpoint].extend(faults)

    def always(self, endpoint: str, fault: str | None) -> None:
        """Every call to `endpoint` fails this way until called again with None."""
        if fault is None:
            self._always.pop(endpoint, None)
        else:
            self._always[endpoint] = fault

    def next_fault(self, endpoint: str) -> str | None:
        if self._faults[endpoint]:
            return self._faults[endpoint].popleft()
        if endpoint in self._always:
            return self._always[endpoint]
        if self.fault_rate and endpoint != "image" and self._random.random() < self.fault_rate:
            return self._random.choice(RANDOM_FAULTS)
        return None

    def add_task(self, prompt: str = "a test task", outcome: str | None = None, **params: Any) -> str:
        task_uuid = str(uuidlib.uuid4())
        created = time.monotonic()
        duration = None
        if self.seconds_to_complete is not None:
            duration = self.seconds_to_complete + random.Random(task_uuid).uniform(0, self.completion_spread)
        self.tasks[task_uuid] = {
            "uuid": task_uuid, "prompt": prompt, "created": created, "reads": 0, "duration": duration,
            "completes_at": None if duration is None else created + duration,
            "outcome": outcome or self.outcome,
            "width": params.get("width", 1024), "height": params.get("height", 1024),
            "batch_size": params.get("batch_size", 1), "params": params,
        }
        return task_uuid

    def stats(self) -> dict[str, Any]:
        gaps = [b - a for times in self.read_times.values() for a, b in zip(times, times[1:])]
        return {"calls": dict(self.calls), "tasks": len(self.tasks),
                "task_reads": sum(self.task_reads.values()),
                "max_reads_per_task": max(self.task_reads.values(), default=0),
                # per task: [first read, last read, reads]
                "read_windows": {u: [t[0], t[-1], len(t)] for u, t in self.read_times.items()},
                "min_read_gap": min(gaps, default=None),
                # monotonic clock readings, comparable across processes on one Linux machine
                "task_uuids": list(self.tasks),
                "completes_at": {u: t["completes_at"] for u, t in self.tasks.items() if t["completes_at"]},
                "finished_seen_at": {u: t["finished_seen_at"] for u, t in self.tasks.items()
                                     if "finished_seen_at" in t}}

    # -- task state ---------------------------------------------------------------------------

    def task_view(self, task: dict[str, Any], base_url: str) -> dict[str, Any]:
        view: dict[str, Any] = {"id": task["uuid"][:8], "uuid": task["uuid"], "prompt": task["prompt"],
                                "width": task["width"], "height": task["height"]}
        if task["duration"] is not None:
            fraction = (time.monotonic() - task["created"]) / task["duration"] if task["duration"] else 1
        else:
            fraction = task["reads"] / self.reads_to_complete if self.reads_to_complete else 1
        if task["outcome"] == "never":
            fraction = min(fraction, 0.9)
        if fraction >= 1 and task["outcome"] == "fail":
            view.update(taskStatus="failed", progress=100, errorMessage=self.error_message)
        elif fraction >= 1:
            urls = self.result_urls.get(task["prompt"]) or [
                "%s/images/%s_%d.png" % (base_url, task["uuid"], i) for i in range(task["batch_size"])]
            view.update(taskStatus="completed", progress=100)
            if self.result_style == "single":
                view["resultUrl"] = urls[0]
            elif self.result_style == "json_string":
                view["resultUrl"] = json.dumps(urls)
            else:
                view["resultUrls"] = urls
        elif (fraction < 0.2) if task["duration"] is not None else task["reads"] <= 1:
            view.update(taskStatus="pending", progress=0, queuePosition=1)
        else:
            view.update(taskStatus="processing", progress=int(min(fraction, 0.99) * 100))
        return view

    def make_app(self) -> Application:
        return Application([
            (r"/api/z-image/generate", _GenerateHandler, {"fake": self}),
            (r"/api/z-image/task/([^/]+)", _TaskHandler, {"fake": self}),
            (r"/api/z-image/batch-status/([^/]+)", _BatchHandler, {"fake": self}),
            (r"/api/prompt-moderation/check", _ModerationHandler, {"fake": self}),
            (r"/images/([A-Za-z0-9-]+)_(\d+)\.png", _ImageHandler, {"fake": self}),
            (r"/redirect", _RedirectHandler, {"fake": self}),
            (r"/_fake/stats", _StatsHandler, {"fake": self}),
            (r"/_fake/complete", _CompleteHandler, {"fake": self}),
        ])

    def complete_all(self) -> int:
        """Every running task completes now (a benchmark's burst of endings); returns how many."""
        now, count = time.monotonic(), 0
        for task in self.tasks.values():
            if task["completes_at"] is not None and task["completes_at"] > now:
                task["duration"], task["completes_at"] = now - task["created"], now
                count += 1
        return count


class _FakeHandler(RequestHandler):
    endpoint = ""
    fault: str | None = None  # the fault this call plays

    def initialize(self, fake: FakeZImage) -> None:
        self.fake = fake

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    async def misbehave(self) -> bool:
        """Plays the next fault, if any; True when the answer has been given (or refused)."""
        self.fake.calls[self.endpoint] += 1
        self.fake.request_headers.append(dict(self.request.headers))
        self.fake.peers.add(self.request.connection.context.address)  # type: ignore[union-attr]
        fault = self.fault = self.fake.next_fault(self.endpoint)
        cookie = self.fake.session_cookie
        if fault is None and cookie is not None and self.endpoint != "image" \
                and self.request.headers.get("Cookie") != cookie:
            fault = "challenge"
        if fault is None:
            return False
        if fault == "challenge":  # what a Cloudflare-fronted service answers a server it will not trust
            self.set_status(403)
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.set_header("cf-mitigated", "challenge")
            self.finish("<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>"
                        "<div id=\"challenge-platform\">Checking your browser</div></body></html>")
            return True
        if fault == "hang":
            await asyncio.sleep(self.fake.hang_seconds)
            return False
        if fault == "reset":
            self.request.connection.stream.close()  # type: ignore[union-attr]
            return True
        if fault in ("502", "503"):
            self.set_status(int(fault))
            self.set_header("Content-Type", "text/html")
            self.finish("<html><body><h1>%s Bad Gateway</h1></body></html>" % fault)
            return True
        if fault == "garbage":
            self.set_header("Content-Type", "text/html")
            self.finish("<html>surprise</html>")
            return True
        if fault == "429":
            self.set_header("Retry-After", self.fake.retry_after)
            self.reply({"success": False, "error": "Rate limit exceeded, slow down"}, 429)
            return True
        if fault in ("500", "400", "404", "false200"):
            messages = {"500": "Internal server error", "400": "Prompt is required and must be a string",
                        "404": "Task not found", "false200": "Service busy, try again later"}
            self.reply({"success": False, "error": messages[fault]}, 200 if fault == "false200" else int(fault))
            return True
        if fault == "huge_answer":
            self.reply({"success": True, "data": {"padding": "x" * (9 * 1024 * 1024)}})
            return True
        if fault == "no_uuid":
            self.reply({"success": True, "data": {}})
            return True
        return False  # "unknown_status" is played by the task handler itself


class _GenerateHandler(_FakeHandler):
    endpoint = "generate"

    async def post(self) -> None:
        if await self.misbehave():
            return
        try:
            body = json.loads(self.request.body)
        except ValueError:
            return self.reply({"success": False, "error": "Invalid JSON"}, 400)
        self.fake.generate_bodies.append(body)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            return self.reply({"success": False, "error": "Prompt is required and must be a string"}, 400)
        if self.fake.protocol == "camel":
            if "modelType" not in body:
                return self.reply({"success": False, "error": "modelType is required"}, 400)
            if self.fake.moderation and body.get("promptModerationToken") not in self.fake.tokens:
                return self.reply({"success": False, "error": "promptModerationToken is required"}, 400)
            params = {"width": body.get("width", 1024), "height": body.get("height", 1024),
                      "batch_size": body.get("batchSize", 1), "steps": body.get("steps"), "model": body["modelType"]}
        else:
            params = {k: body[k] for k in ("width", "height", "batch_size", "steps", "model") if k in body}
        base = self.request.protocol + "://" + self.request.host
        if self.fake.protocol == "camel" and self.fake.batches and params["batch_size"] > 1:
            parent = str(uuidlib.uuid4())
            self.fake.parents[parent] = [self.fake.add_task(prompt, **{**params, "batch_size": 1})
                                         for _ in range(params["batch_size"])]
            return self.reply({"success": True, "data": {"parentTaskUuid": parent}})
        task_uuid = self.fake.add_task(prompt, **params)
        view = self.fake.task_view(self.fake.tasks[task_uuid], base)
        view.update(taskStatus="pending", progress=0)
        data: dict[str, Any] = {"task": view}
        if self.fake.uuid_at == "data":
            data["uuid"] = task_uuid
            view.pop("uuid")
        self.reply({"success": True, "data": data})


class _ModerationHandler(_FakeHandler):
    endpoint = "moderation"

    async def post(self) -> None:
        if await self.misbehave():
            return
        body = json.loads(self.request.body or b"{}")
        prompt = str(body.get("prompt", ""))
        if body.get("routeKey") != "text_to_image":
            return self.reply({"success": False, "error": "routeKey is required"}, 400)
        if any(word in prompt.lower() for word in self.fake.banned_words):
            return self.reply({"success": True, "data": {"allowed": False, "reason": "The prompt was refused"}})
        token = uuidlib.uuid4().hex
        self.fake.tokens.add(token)
        self.reply({"success": True, "data": {"allowed": True, "promptModerationToken": token}})


class _BatchHandler(_FakeHandler):
    endpoint = "task"

    async def get(self, parent: str) -> None:
        if await self.misbehave():
            return
        children = self.fake.parents.get(parent)
        if children is None:
            return self.reply({"success": False, "error": "Batch not found"}, 404)
        base = self.request.protocol + "://" + self.request.host
        views = []
        for uuid in children:
            task = self.fake.tasks[uuid]
            task["reads"] += 1
            view = self.fake.task_view(task, base)
            urls = view.pop("resultUrls", None)
            views.append({"uuid": uuid, "status": view["taskStatus"], "progress": view.get("progress"),
                          **({"resultUrl": urls[0]} if urls else {}),
                          **({"errorMessage": view["errorMessage"]} if "errorMessage" in view else {})})
        done = all(v["status"] in ("completed", "failed") for v in views)
        self.reply({"success": True, "data": {"allCompleted": done, "tasks": views}})


class _TaskHandler(_FakeHandler):
    endpoint = "task"

    async def get(self, task_uuid: str) -> None:
        self.fake.task_reads[task_uuid] += 1
        self.fake.read_times[task_uuid].append(time.monotonic())
        if await self.misbehave():
            return
        task = self.fake.tasks.get(task_uuid)
        if task is None:
            return self.reply({"success": False, "error": "Task not found"}, 404)
        task["reads"] += 1
        view = self.fake.task_view(task, self.request.protocol + "://" + self.request.host)
        if view["taskStatus"] in ("completed", "failed"):
            task.setdefault("finished_seen_at", time.monotonic())  # benchmarks measure delivery from here
        if self.fault == "unknown_status":
            view.update(taskStatus="mystery", progress=None)
        self.reply({"success": True, "data": {"task": view}})


class _ImageHandler(_FakeHandler):
    endpoint = "image"

    async def get(self, task_uuid: str, index: str) -> None:
        if await self.misbehave():
            return
        if self.fault in ("endless", "huge_length"):
            return await self.endless()
        if self.fault == "wild_length":  # what RequestHandler would never write: its own header checks
            stream = self.request.connection.detach()  # type: ignore[union-attr]
            await stream.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %s\r\n\r\n\x89PNG"
                               % (b"9" * 5000))
            stream.close()
            return
        task = self.fake.tasks.get(task_uuid)
        if task is None or int(index) >= task["batch_size"]:
            return self.reply({"success": False, "error": "Image not found"}, 404)
        lifetime = self.fake.links_live_for
        if lifetime is not None and time.monotonic() - task["created"] > lifetime:  # a host that deletes outputs
            return self.reply({"success": False, "error": "This output has expired"}, 404)
        self.set_header("Content-Type", "image/png")
        if self.fake.noise_side:
            picture = noise_png(self.fake.noise_side, "%s#%s" % (task_uuid, index))
        else:
            picture = self.fake.image_override or render_png(task["prompt"], int(index), task["width"], task["height"])
        self.fake.image_bytes_sent += len(picture)
        self.fake.images_served += 1
        self.finish(picture)

    async def endless(self) -> None:
        self.set_header("Content-Type", "image/png")
        if self.fault == "huge_length":
            self.set_header("Content-Length", str(10 ** 10))
        chunk = b"\x89PNG" + b"\0" * 99999  # not a divisor of a power of two: a limit falls mid-chunk
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                self.write(chunk)
                await self.flush()
                self.fake.image_bytes_sent += len(chunk)
        except Exception:  # noqa: BLE001 - the client hung up: that is the point
            return


class _RedirectHandler(_FakeHandler):
    endpoint = "redirect"

    def get(self) -> None:
        self.fake.redirects += 1
        self.redirect(self.get_query_argument("to"))


class _StatsHandler(_FakeHandler):
    def get(self) -> None:
        self.reply(self.fake.stats())


class _CompleteHandler(_FakeHandler):
    def post(self) -> None:
        self.reply({"completed": self.fake.complete_all()})


@lru_cache(maxsize=64)
def render_png(prompt: str, index: int, width: int, height: int) -> bytes:
    """A deterministic picture for a prompt: vertical stripes, each fading from one colour of the
    prompt's palette to another. Different prompts (and images of a batch) look different."""
    digest = hashlib.sha256(("%s#%d" % (prompt, index)).encode()).digest()
    palette = [digest[i:i + 3] for i in range(0, 24, 3)]
    stripes = 3 + digest[24] % 6
    edges = [width * s // stripes for s in range(stripes + 1)]
    rows = []
    for y in range(height):
        t = y / max(1, height - 1)
        pixels = b"".join(
            bytes(round(a + (b - a) * t) for a, b in zip(palette[s % 8], palette[(s + 1 + digest[25] % 7) % 8]))
            * (edges[s + 1] - edges[s])
            for s in range(stripes))
        rows.append(b"\x00" + pixels)  # filter type 0 for each scanline
    return png(width, height, b"".join(rows), 6)


def noise_png(side: int, seed: Any = None) -> bytes:
    """A valid RGB PNG of random pixels, stored uncompressed (side * side * 3 bytes and a little
    more): what a large picture costs, byte for byte. `seed` makes it the same each time."""
    draw = random.Random(seed).randbytes if seed is not None else random.randbytes
    return png(side, side, b"".join(b"\0" + draw(side * 3) for _ in range(side)), 0)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, raw: bytes, level: int) -> bytes:
    """8-bit RGB scanlines (each with its filter byte) as a PNG file."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw, level))
            + png_chunk(b"IEND", b""))


def main() -> None:
    import argparse

    from tornado.httpserver import HTTPServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--reads-to-complete", type=int, default=2)
    parser.add_argument("--seconds-to-complete", type=float, default=None)
    parser.add_argument("--completion-spread", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of calls that fail at random")
    parser.add_argument("--hang-seconds", type=float, default=5.0)
    parser.add_argument("--image-bytes", type=int, default=0, help="serve every picture as this many bytes")
    parser.add_argument("--noise-side", type=int, default=0,
                        help="every picture random noise of this side (3 x side^2 bytes, distinct per picture)")
    parser.add_argument("--links-live-for", type=float, default=None,
                        help="a task's pictures answer 404 this many seconds after its submit")
    args = parser.parse_args()

    async def run() -> None:
        fake = FakeZImage(reads_to_complete=args.reads_to_complete, seconds_to_complete=args.seconds_to_complete,
                          completion_spread=args.completion_spread, fault_rate=args.fault_rate,
                          hang_seconds=args.hang_seconds)
        fake.links_live_for = args.links_live_for
        fake.noise_side = args.noise_side
        if args.image_bytes:
            fake.image_override = b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(args.image_bytes - 8)
        HTTPServer(fake.make_app()).listen(args.port, args.address)
        print("fake Z-Image listening on http://%s:%d" % (args.address, args.port), flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
