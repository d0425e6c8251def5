"""What the third hostile review found, each tried the way it was found: through real gateway
processes (or a gateway on real sockets), a hostile image host and hostile receivers."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
from PIL import Image
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.tcpserver import TCPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from conftest import ROOT
from helpers import eventually, rss_kib
from zimage_tornado.fake_upstream import png_chunk, render_png

CHAT = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a cat"}]}


def declared_bomb(side: int = 13000) -> bytes:
    """A valid PNG of side x side black RGB pixels: about 0.5 MB that decodes to 500 MB."""
    squeeze = zlib.compressobj(9)
    row = b"\0" * (1 + side * 3)
    data = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


async def generate(gateway, **extra):
    response = await gateway.fetch("/v1/images/generations", method="POST", body=json.dumps(
        {"prompt": "a picture", "response_format": "b64_json", **extra}))
    return response.code, json.loads(response.body)


# -- 1. a picture that declares a size no model makes --------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_a_picture_declaring_13000_squared_is_refused_before_decoding_and_memory_stays_flat(gateways, fake):
    gateway = gateways("--max_attempts=100")
    await gateway.started()
    code, _ = await generate(gateway, output_format="webp")  # Pillow and the pools are loaded
    assert code == 200
    before = rss_kib(gateway.proc.pid)
    fake.image_override = declared_bomb()
    answers = await asyncio.gather(*(generate(gateway, output_format=fmt, output_compression=quality)
                                     for fmt in ("webp", "jpeg") for quality in (10, 40, 70, 95)))
    answers.append(await generate(gateway))  # and as PNG, passed through unconverted before
    for code, body in answers:
        assert code == 502, body
        assert "Picture 0 of task" in body["error"]["message"] and "13000x13000" in body["error"]["message"]
    peak = rss_kib(gateway.proc.pid, "VmHWM")
    assert peak - before < 200 * 1024, "RSS grew from %d to a peak of %d KiB" % (before, peak)
    assert (await gateway.fetch("/health")).code == 200


@pytest.mark.parametrize("content", [b"GIF89a" + b"\0" * 100, b"<html><body>not found</body></html>",
                                     render_png("truncated", 0, 64, 64)[:-40]])
@pytest.mark.gen_test(timeout=20)
async def test_b64_json_png_refuses_bytes_that_are_not_a_whole_picture(proxy, fake, content):
    fake.image_override = content
    code, body = await proxy.json("/v1/images/generations", "POST", {"prompt": "x", "response_format": "b64_json"})
    assert code == 502, body
    assert "Picture 0 of task" in body["error"]["message"]


@pytest.mark.gen_test(timeout=20)
async def test_compression_values_fold_into_levels_so_near_values_are_one_conversion(proxy, fake):
    uuid = await proxy.submit()
    code, _ = await proxy.json("/v1/images/%s" % uuid)
    assert code == 200
    bodies = [(await proxy.request("/v1/images/%s/0?format=webp&compression=%d" % (uuid, q))).body
              for q in (76, 85, 90, 91)]
    assert bodies[0] == bodies[1] == bodies[2] != bodies[3]  # 76-90 are quality 90; 91 is 100
    assert Image.open(io.BytesIO(bodies[0])).format == "WEBP"


# -- 2. a crash does not free an Idempotency-Key --------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_keyed_submit_interrupted_by_sigkill_is_never_submitted_again(gateways, fake):
    fake.always("generate", "hang")
    fake.hang_seconds = 3.0
    gateway = gateways()
    await gateway.started()
    headers = {"Idempotency-Key": "order-42", "Content-Type": "application/json"}
    pending = asyncio.ensure_future(gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps(CHAT),
                                                  headers=headers))
    await eventually(lambda: fake.calls["generate"] == 1, 10, 0.02, "the submit did not reach the upstream")
    gateway.kill()  # SIGKILL while the upstream holds the submit
    await asyncio.gather(pending, return_exceptions=True)
    fake.always("generate", None)
    await asyncio.sleep(3.5)  # the hung submit is answered (a job exists upstream)
    again = gateways()
    await again.started()
    retry = await again.fetch("/v1/chat/completions", method="POST", body=json.dumps(CHAT), headers=headers)
    assert retry.code == 504, retry.body
    assert retry.headers.get("x-should-retry") == "false"
    assert json.loads(retry.body)["error"]["code"] == "upstream_outcome_unknown"
    assert fake.calls["generate"] == 1  # one job for one key
    later = await again.fetch("/v1/chat/completions", method="POST", body=json.dumps(CHAT), headers=headers)
    assert later.code == 504 and fake.calls["generate"] == 1


# -- 3. the last key revoked ---------------------------------------------------------------------


def keys_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zimage_tornado", "keys", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.gen_test(timeout=60)
async def test_revoking_the_only_key_closes_the_gateway_instead_of_opening_it(gateways, tmp_path):
    keys = tmp_path / "keys.toml"
    added = keys_command("add", "alice", "--file", str(keys))
    assert added.returncode == 0, added.stderr
    alice = {"Authorization": "Bearer " + added.stdout.strip()}
    gateway = gateways("--api_keys_file=%s" % keys)
    await gateway.started()
    assert (await gateway.fetch("/v1/models", headers=alice)).code == 200
    assert keys_command("revoke", "alice", "--file", str(keys)).returncode == 0
    gateway.proc.send_signal(signal.SIGHUP)

    async def refused():
        return (await gateway.fetch("/v1/models", headers=alice)).code == 401
    await eventually(refused, 10, 0.1, "the revoked key still works")
    assert (await gateway.fetch("/v1/models")).code == 401
    keys.unlink()  # a file that becomes unreadable admits nobody either
    gateway.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert (await gateway.fetch("/v1/models")).code == 401


@pytest.mark.gen_test(timeout=30)
async def test_an_open_gateway_says_so_when_it_starts(gateways):
    gateway = gateways()
    await gateway.started()
    assert "OPEN to anyone" in gateway.log()


# -- 6. keys add and revoke do not lose each other's work ----------------------------------------


def test_twenty_keys_added_at_once_are_all_in_the_file_and_a_symlink_stays_a_link(tmp_path):
    real = tmp_path / "real-keys.toml"
    real.write_text("# the team's keys\n")
    link = tmp_path / "keys.toml"
    link.symlink_to(real)
    procs = [subprocess.Popen([sys.executable, "-m", "zimage_tornado", "keys", "add", "k%02d" % i, "--file",
                               str(link)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(20)]
    printed = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        printed.append(out.strip())
    assert link.is_symlink()
    from zimage_tornado.tenants import load_keys
    ring = load_keys("", str(link))
    assert sorted(ring.names) == ["k%02d" % i for i in range(20)]
    assert all(ring.identify("Bearer " + key) is not None for key in printed)
    # a revoke racing adds: every reported revoke is in force
    revoke = subprocess.Popen([sys.executable, "-m", "zimage_tornado", "keys", "revoke", "k00", "--file", str(link)],
                              cwd=ROOT, stderr=subprocess.PIPE)
    adds = [subprocess.Popen([sys.executable, "-m", "zimage_tornado", "keys", "add", "n%d" % i, "--file", str(link)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(5)]
    assert revoke.wait(60) == 0 and all(add.wait(60) == 0 for add in adds)
    names = load_keys("", str(link)).names
    assert "k00" not in names and all("n%d" % i in names for i in range(5))


# -- 7. IPv6 forms carrying an IPv4 address ------------------------------------------------------


@pytest.mark.parametrize("host", ["[::7f00:1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[64:ff9b::a00:1]",
                                  "[2002:7f00:1::1]", "[::ffff:0:7f00:1]", "[fec0::1]", "[64:ff9b:1::a00:1]"])
@pytest.mark.gen_test(timeout=20)
async def test_ipv6_forms_of_private_ipv4_addresses_are_refused_as_webhook_urls(make_proxy, fake, host):
    proxy = make_proxy(webhook_secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    code, body = await proxy.json("/v1/images/generations", "POST", {
        "prompt": "x", "webhook": "http://%s:8080/hook" % host}, headers={"Prefer": "wait=0"})
    assert code == 400, body
    assert body["error"]["code"] == "invalid_webhook_url"
    assert fake.calls["generate"] == 0


# -- 8. the task list is a read ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_the_task_list_counts_against_reads_per_minute(make_proxy, fake):
    proxy = make_proxy(ip_reads_per_minute=5)
    codes = [(await proxy.request("/v1/tasks")).code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]


# -- 9. paging never repeats a task (SQLite and Redis) -------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
@pytest.mark.gen_test(timeout=120)
async def test_paging_three_hundred_tasks_with_limit_1_returns_each_once(make_proxy, fake, tmp_path, request,
                                                                          backend):
    settings = {"database": str(tmp_path / "db.sqlite3")}
    if backend == "redis":
        settings = {"redis_url": request.getfixturevalue("redis_server").url}
    proxy = make_proxy(follow_budget=0, **settings)
    made = []
    for start in range(0, 300, 30):
        made += await asyncio.gather(*(proxy.submit("task %d" % i) for i in range(start, start + 30)))
    for uuid in made:  # they end: the store writes their end (Redis' script re-encoded the whole task)
        fake.tasks[uuid]["created"] -= 3600
    for start in range(0, 300, 30):
        await asyncio.gather(*(proxy.json("/v1/images/%s" % uuid) for uuid in made[start:start + 30]))
    await asyncio.sleep(0.5)  # the ends are written behind the answers
    seen, after = [], None
    for _ in range(400):
        code, page = await proxy.json("/v1/tasks?limit=1" + ("&after=%s" % after if after else ""))
        assert code == 200, page
        seen += [task["id"] for task in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == len(set(seen)) == 300
    assert set(seen) == set(made)


# -- 10. one SQLite file, whatever name reaches it -----------------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.gen_test(timeout=30)
async def test_a_second_gateway_through_a_link_to_the_database_is_refused(gateways, tmp_path, link):
    first = gateways()
    await first.started()
    other = tmp_path / "blue-green.sqlite3"
    (other.symlink_to if link == "symlink" else other.hardlink_to)(first.database)
    second = gateways(env={"ZIMAGE_DATABASE": str(other)})
    assert await second.stopped(signum=None) == 1
    assert "in use by another gateway" in second.log() and str(first.proc.pid) in second.log()


# -- 11. CSV cells ---------------------------------------------------------------------------------


def test_csv_cells_starting_with_tab_cr_or_lf_are_defused():
    from zimage_tornado.reports import csv_text
    text = csv_text(("a",), [["\t=1+1"], ["\r=cmd"], ["\n@x"], ["-2"], ["plain"]])
    cells = [row[0] for row in csv.reader(io.StringIO(text, newline=""))][1:]
    assert cells == ["'\t=1+1", "'\r=cmd", "'\n@x", "'-2", "plain"]


# -- 4, 5 and 13. webhook receivers that hang, shout, or outlive their key -------------------------


class HugeHeaderReceiver(TCPServer):
    """Answers every request with a 70 KiB header line."""

    sent = 0

    async def handle_stream(self, stream: IOStream, address) -> None:
        try:
            await stream.read_until(b"\r\n\r\n")
            HugeHeaderReceiver.sent += 1
            await stream.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70 * 1024 + b"\r\nContent-Length: 0\r\n\r\n")
        finally:
            stream.close()


class Silent(TCPServer):
    """Accepts and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[IOStream] = []

    async def handle_stream(self, stream: IOStream, address) -> None:
        self.streams.append(stream)


class Receiver(RequestHandler):
    def initialize(self, seen: list) -> None:
        self.seen = seen

    def post(self) -> None:
        self.seen.append((time.monotonic(), json.loads(self.request.body)))


SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.gen_test(timeout=40)
async def test_a_receiver_whose_header_cannot_be_read_gets_its_attempts_counted_and_given_up(make_proxy, caplog):
    sock, port = bind_unused_port()
    server = HugeHeaderReceiver()
    server.add_sockets([sock])
    proxy = make_proxy(webhook_secret=SECRET, webhook_hosts="127.0.0.1", webhook_max_attempts=3,
                       webhook_retry_delays="0.1", webhook_timeout=2)
    code, body = await proxy.json("/v1/images/generations", "POST", {
        "prompt": "x", "webhook": "http://127.0.0.1:%d/hook" % port})
    assert code == 200, body

    async def given_up():
        _, page = await proxy.json("/v1/webhooks")
        return page["data"] and page["data"][0]["status"] == "failed" and page["data"][0]
    message = await eventually(given_up, 20, 0.1, "the message was not given up")
    assert message["attempts"] == 3 and "gave up after 3 attempts" in message["last_error"]
    await asyncio.sleep(0.5)
    assert HugeHeaderReceiver.sent == 3
    assert "Traceback" not in caplog.text and "unexpectedly" not in caplog.text
    server.stop()


@pytest.mark.gen_test(timeout=60)
async def test_one_tenants_dead_receiver_does_not_delay_anothers_webhook(make_proxy, tmp_path):
    silent = Silent()
    dead_sock, dead_port = bind_unused_port()
    silent.add_sockets([dead_sock])
    seen: list = []
    live = HTTPServer(Application([(r"/hook", Receiver, {"seen": seen})]))
    live_sock, live_port = bind_unused_port()
    live.add_sockets([live_sock])
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\n[keys.bob]\nkey = "sk-bob"\n')
    proxy = make_proxy(webhook_secret=SECRET, api_keys_file=str(keys), webhook_deliveries=8, webhook_timeout=30,
                       webhook_hosts="127.0.0.1,localhost")
    alice = {"Authorization": "Bearer sk-alice"}
    for _ in range(24):
        code, body = await proxy.json("/v1/images/generations", "POST", {
            "prompt": "alice", "webhook": "http://127.0.0.1:%d/hook" % dead_port}, headers=alice)
        assert code == 200, body
    await eventually(lambda: len(silent.streams) >= 1, 10, 0.05, "alice's receiver was never called")
    await asyncio.sleep(0.5)
    assert len(silent.streams) <= 2  # a host's share of 8 slots: one; the rest wait in the store
    code, body = await proxy.json("/v1/images/generations", "POST", {
        "prompt": "bob", "webhook": "http://localhost:%d/hook" % live_port},
        headers={"Authorization": "Bearer sk-bob"})
    assert code == 200
    ended = time.monotonic()
    await eventually(lambda: seen, 10, 0.02, "bob's webhook never came")
    assert seen[0][0] - ended < 2.0
    for stream in silent.streams:
        stream.close()
    silent.stop()
    live.stop()


@pytest.mark.gen_test(timeout=40)
async def test_a_revoked_keys_stream_is_closed_and_its_messages_given_up(make_proxy, fake, tmp_path):
    fake.outcome = "never"
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\n[keys.admin]\nkey = "sk-admin"\nadmin = true\n')
    silent = Silent()
    sock, port = bind_unused_port()
    silent.add_sockets([sock])
    proxy = make_proxy(webhook_secret=SECRET, api_keys_file=str(keys), webhook_hosts="127.0.0.1",
                       webhook_retry_delays="0.2,3600", webhook_timeout=0.3, follow_budget=600)
    alice = {"Authorization": "Bearer sk-alice"}
    code, body = await proxy.json("/v1/images/generations", "POST", {
        "prompt": "x", "webhook": "http://127.0.0.1:%d/hook" % port, "webhook_events": ["task.progress",
                                                                                            "task.completed"]},
        headers={**alice, "Prefer": "wait=0"})
    assert code == 202, body
    uuid = body["id"]
    chunks: list[bytes] = []
    stream = asyncio.ensure_future(proxy.http.fetch(
        proxy.url + "/v1/tasks/%s/events" % uuid, headers=alice, request_timeout=30, raise_error=False,
        streaming_callback=chunks.append))
    await eventually(lambda: chunks, 5, 0.02, "the stream did not start")
    admin = {"Authorization": "Bearer sk-admin"}

    async def waiting_an_hour():  # progress messages that failed twice: next try in an hour
        _, page = await proxy.json("/admin/webhooks?status=pending", headers=admin)
        return [m for m in page["data"] if m["attempts"] >= 2]
    await eventually(waiting_an_hour, 10, 0.1, "no message waits for its next try")
    keys.write_text('[keys.admin]\nkey = "sk-admin"\nadmin = true\n')
    proxy.gateway.live_keys.reload("test")
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(stream, return_exceptions=True), 5)
    assert time.monotonic() - started < 2

    async def none_pending():  # given up at the reload, not in an hour
        _, page = await proxy.json("/admin/webhooks?status=pending", headers=admin)
        return not page["data"]
    await eventually(none_pending, 2, 0.05, "a revoked key's messages still wait for their next try")
    fake.tasks[uuid]["outcome"] = "complete"
    fake.tasks[uuid]["created"] -= 3600

    async def settled():
        _, page = await proxy.json("/admin/webhooks", headers={"Authorization": "Bearer sk-admin"})
        return page["data"] and all(m["status"] == "failed" for m in page["data"]) and page["data"]
    messages = await eventually(settled, 20, 0.1, "alice's messages were not given up")
    assert any(m["last_error"] == "not sent: the key was revoked" for m in messages)
    silent.stop()


# -- 14. heartbeats on their own timer -------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_has_a_heartbeat_every_interval_even_when_polling_is_slower(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=3.0, stream_heartbeat=0.3)
    uuid = await proxy.submit()
    chunks: list[tuple[float, bytes]] = []
    fetch = asyncio.ensure_future(proxy.http.fetch(
        proxy.url + "/v1/tasks/%s/events" % uuid, request_timeout=2.5, raise_error=False,
        streaming_callback=lambda chunk: chunks.append((time.monotonic(), chunk))))
    await asyncio.gather(fetch, return_exceptions=True)
    times = [at for at, chunk in chunks if b": waiting" in chunk]
    assert len(times) >= 5
    assert max(b - a for a, b in zip(times, times[1:])) < 0.6


# -- 15. malformed and unknown task ids ------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_not_a_uuid_is_400_and_an_unknown_tasks_events_are_404(proxy, fake):
    code, body = await proxy.json("/v1/tasks/not-a-uuid")
    assert code == 400 and body["error"]["param"] == "uuid"
    assert sum(fake.calls.values()) == 0
    code, body = await proxy.json("/v1/tasks/00000000-0000-4000-8000-00000000dead/events")
    assert code == 404, body
    assert body["error"]["code"] == "task_not_found"



@pytest.mark.gen_test(timeout=60)
async def test_a_burst_to_one_healthy_receiver_is_not_slowed_by_its_share(make_proxy):
    seen: list = []
    live = HTTPServer(Application([(r"/hook", Receiver, {"seen": seen})]))
    sock, port = bind_unused_port()
    live.add_sockets([sock])
    proxy = make_proxy(webhook_secret=SECRET, webhook_deliveries=8, webhook_hosts="127.0.0.1",
                       upstream_reads_per_second=0, max_attempts=200)
    started = time.monotonic()
    for _ in range(30):  # one host's share of 8 slots is 1: the others are held and start as it frees
        code, _ = await proxy.json("/v1/images/generations", "POST", {
            "prompt": "x", "webhook": "http://127.0.0.1:%d/hook" % port}, headers={"Prefer": "wait=0"})
        assert code == 202
    await eventually(lambda: len(seen) == 30, 15, 0.05, lambda: "delivered %d of 30" % len(seen))
    assert time.monotonic() - started < 8
    assert len({json.dumps(body["data"], sort_keys=True) for _, body in seen}) == 30  # 30 tasks, once each
    live.stop()
