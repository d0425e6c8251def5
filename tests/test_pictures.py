"""Pictures that outlive their links (pictures=keep): fetched once on completion and kept, served
by the gateway under signed links, 410 once removed, the OpenAI answer collected later."""

import asyncio
import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import openai
import pytest
from PIL import Image

from helpers import eventually, fill
from zimage_tornado.fake_upstream import render_png
from zimage_tornado.links import ROUNDING
from zimage_tornado.web import ranges
from zimage_tornado.errors import ApiError

KEYS = "sk-alice"
AUTH = {"Authorization": "Bearer sk-alice"}


def keeping(make_proxy, tmp_path, **overrides):
    return make_proxy(pictures="keep", pictures_dir=str(tmp_path / "pictures"), **overrides)


def kept_files(tmp_path):
    objects = tmp_path / "pictures" / "objects"
    return sorted(p for p in objects.rglob("*") if p.is_file()) if objects.exists() else []


async def submit_and_wait(proxy, n=1, prompt="a lighthouse at dusk", headers=None, **extra):
    code, body = await proxy.json("/v1/images/generations", "POST", {
        "model": "zimage-turbo", "prompt": prompt, "n": n, "size": "256x256", **extra}, headers=headers)
    assert code == 200, body
    return body


@pytest.mark.gen_test(timeout=30)
async def test_a_completed_task_is_kept_with_nobody_waiting(make_proxy, fake, tmp_path):
    proxy = keeping(make_proxy, tmp_path)
    uuid = await proxy.submit("a red kite over the sea", batch_size=2)  # answered at once: nobody waits
    manifest = tmp_path / "pictures" / "tasks" / ("%s.json" % uuid)
    await eventually(manifest.exists, 10, 0.05, "the pictures were not kept")
    kept = json.loads(manifest.read_text())
    task = fake.tasks[uuid]
    originals = [render_png(task["prompt"], i, task["width"], task["height"]) for i in range(2)]
    assert [p["sha256"] for p in kept["pictures"]] == [hashlib.sha256(o).hexdigest() for o in originals]
    assert [p["type"] for p in kept["pictures"]] == ["image/png", "image/png"]
    assert len(kept["source_urls"]) == 2 and all(fake_url in kept["source_urls"][0] for fake_url in ["/images/"])
    assert len(kept_files(tmp_path)) == 2
    assert not list((tmp_path / "pictures" / "tmp").glob("tmp*"))  # written by rename, nothing left half-done


@pytest.mark.gen_test(timeout=30)
async def test_signed_links_serve_every_picture_after_the_providers_links_die(make_proxy, fake, tmp_path):
    proxy = keeping(make_proxy, tmp_path, api_keys=KEYS)
    body = await submit_and_wait(proxy, n=2, headers=AUTH)
    links = [item["url"] for item in body["data"]]
    assert all(link.startswith(proxy.url + "/v1/images/") and "signature=" in link for link in links)
    uuid = urlsplit(links[0]).path.split("/")[3]
    task = fake.tasks[uuid]
    await eventually(lambda: (tmp_path / "pictures" / "tasks" / ("%s.json" % uuid)).exists(), 10, 0.05)
    fake.links_live_for = 0  # the provider deletes its outputs
    served_before = fake.images_served
    for i, link in enumerate(links):
        response = await proxy.http.fetch(link, raise_error=False)  # no Authorization: the signature is the key
        assert response.code == 200, response.body
        assert response.body == render_png(task["prompt"], i, task["width"], task["height"])
        assert response.headers["Content-Type"] == "image/png"
        assert response.headers["ETag"] == '"%s"' % hashlib.sha256(response.body).hexdigest()
        assert "public" in response.headers["Cache-Control"] and "immutable" in response.headers["Cache-Control"]
    assert fake.images_served == served_before  # from the store, not the dead links
    whole = (await proxy.http.fetch(links[0])).body
    part = await proxy.http.fetch(links[0], headers={"Range": "bytes=10-19"}, raise_error=False)
    assert part.code == 206 and part.body == whole[10:20]
    assert part.headers["Content-Range"] == "bytes 10-19/%d" % len(whole)
    etag = part.headers["ETag"]
    again = await proxy.http.fetch(links[0], headers={"If-None-Match": etag}, raise_error=False)
    assert again.code == 304 and not again.body
    # the long-poll, the task list and the event stream give the same links, the provider's as source_urls
    code, ready = await proxy.json("/v1/images/%s" % uuid, headers=AUTH)
    assert code == 200 and ready["image_urls"] == links and len(ready["source_urls"]) == 2
    assert all("/images/%s_" % uuid in url for url in ready["source_urls"])
    code, listed = await proxy.json("/v1/tasks", headers=AUTH)
    assert listed["data"][0]["image_urls"] == links and listed["data"][0]["source_urls"] == ready["source_urls"]


@pytest.mark.gen_test(timeout=30)
async def test_a_tampered_or_expired_link_is_403_and_a_key_still_works(make_proxy, fake, tmp_path):
    now = [time.time()]
    proxy = keeping(make_proxy, tmp_path, api_keys=KEYS, clock=lambda: now[0], link_ttl=3600.0)
    link = (await submit_and_wait(proxy, headers=AUTH))["data"][0]["url"]
    query = parse_qs(urlsplit(link).query)
    signature = query["signature"][0]
    forged = link.replace(signature, ("A" if signature[0] != "A" else "B") + signature[1:])
    response = await proxy.http.fetch(forged, raise_error=False)
    assert response.code == 403 and json.loads(response.body)["error"]["code"] == "invalid_signature"
    other_picture = link.replace("/0?", "/1?")  # a valid signature of another path
    assert (await proxy.http.fetch(other_picture, raise_error=False)).code == 403
    longer = link.replace("expires=%s" % query["expires"][0], "expires=%d" % (int(query["expires"][0]) + 86400))
    assert (await proxy.http.fetch(longer, raise_error=False)).code == 403
    now[0] += 3600 + ROUNDING + 1  # past its expiry
    response = await proxy.http.fetch(link, raise_error=False)
    assert response.code == 403 and json.loads(response.body)["error"]["code"] == "link_expired"
    bare = link.split("?")[0]
    assert (await proxy.http.fetch(bare, raise_error=False)).code == 401  # no signature, no key
    assert (await proxy.http.fetch(bare, headers=AUTH, raise_error=False)).code == 200  # the owner's key


@pytest.mark.gen_test(timeout=60)
async def test_the_budget_keeps_at_most_its_bytes_and_the_oldest_answer_410(make_proxy, fake, tmp_path):
    size = len(render_png("prompt 0", 0, 256, 256))
    budget = 20 * size  # about 20 pictures
    proxy = keeping(make_proxy, tmp_path, pictures_max_bytes=budget, upstream_reads_per_second=0, max_attempts=200)

    async def one(i):
        body = await submit_and_wait(proxy, prompt="prompt %d" % i)
        return body["data"][0]["url"]
    links = []
    for start in range(0, 200, 20):
        links += await asyncio.gather(*(one(i) for i in range(start, start + 20)))
        tasks, wanted = tmp_path / "pictures" / "tasks", start + 20
        await eventually(lambda: len(list(tasks.iterdir())) >= wanted, 10, 0.02)  # noqa: B023 - awaited here
        files = kept_files(tmp_path)
        assert sum(f.stat().st_size for f in files) <= budget  # after every settled write, not only at the end
        if start == 0:  # read once: in the memory cache, which must not outlive its file
            assert (await proxy.http.fetch(links[0], raise_error=False)).code == 200
    response = await proxy.http.fetch(links[0], raise_error=False)
    assert response.code == 410 and json.loads(response.body)["error"]["code"] == "picture_expired"
    assert (await proxy.http.fetch(links[-1], raise_error=False)).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_the_openai_answer_is_collected_later_through_the_sdk(make_proxy, fake, tmp_path, io_loop):
    fake.reads_to_complete = 4
    proxy = keeping(make_proxy, tmp_path)
    response = await proxy.request("/v1/images/generations", "POST", {
        "model": "zimage-turbo", "prompt": "a quiet harbour", "size": "512x512"}, headers={"Prefer": "wait=0"})
    assert response.code == 202
    location = response.headers["Location"]
    assert location.startswith("/v1/images/generations/")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", max_retries=0)

    def collect():
        return client.get(location.removeprefix("/v1"), cast_to=openai.types.ImagesResponse,
                          options={"params": {"response_format": "b64_json", "output_format": "webp"}})
    uuid = location.rsplit("/", 1)[1]
    await eventually(lambda: fake.tasks[uuid]["reads"] >= 4 or None, 10, 0.05)
    answer = await eventually(lambda: proxy.json(location), 10, 0.05)
    assert answer[0] in (200, 202)
    await eventually(lambda: _done(proxy, location), 10, 0.05)
    images = await io_loop.run_in_executor(None, collect)
    picture = Image.open(io.BytesIO(base64.b64decode(images.data[0].b64_json)))
    assert picture.format == "WEBP" and picture.size == (512, 512)


async def _done(proxy, location):
    code, _ = await proxy.json(location)
    return code == 200


@pytest.mark.gen_test(timeout=20)
async def test_the_answer_later_is_202_while_running_and_404_for_another_task(make_proxy, fake, tmp_path):
    fake.outcome = "never"
    proxy = keeping(make_proxy, tmp_path)
    uuid = await proxy.submit("never ends")
    code, body = await proxy.json("/v1/images/generations/%s" % uuid)
    assert code == 202 and body["status"] in ("pending", "processing")
    code, body = await proxy.json("/v1/images/generations/%s" % "0" * 8 + "-0000-4000-8000-000000000000")
    assert code == 404
    code, body = await proxy.json("/v1/images/generations/%s?output_compression=many" % uuid)
    assert code == 400 and body["error"]["param"] == "output_compression"


@pytest.mark.gen_test(timeout=20)
async def test_pictures_link_keeps_the_providers_links(make_proxy, fake, tmp_path):
    proxy = make_proxy(pictures="link", pictures_dir=str(tmp_path / "pictures"))
    body = await submit_and_wait(proxy)
    assert "/images/" in body["data"][0]["url"] and "signature" not in body["data"][0]["url"]
    uuid = next(iter(fake.tasks))
    code, ready = await proxy.json("/v1/images/%s" % uuid)
    assert "source_urls" not in ready and ready["image_urls"][0].startswith(fake_origin(fake, ready))
    await asyncio.sleep(0.3)
    assert not kept_files(tmp_path)


def fake_origin(fake, ready):
    return ready["image_urls"][0].split("/images/")[0]


@pytest.mark.gen_test(timeout=20)
async def test_links_use_public_url_or_only_a_trusted_proxys_forwarded_host(make_proxy, fake, tmp_path):
    proxy = keeping(make_proxy, tmp_path, public_url="https://images.example.com/")
    assert (await submit_and_wait(proxy))["data"][0]["url"].startswith("https://images.example.com/v1/images/")
    proxy = keeping(make_proxy, tmp_path, trusted_proxies="127.0.0.1")
    body = await submit_and_wait(proxy, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example"})
    assert body["data"][0]["url"].startswith("https://gw.example/v1/images/")
    proxy = keeping(make_proxy, tmp_path)
    body = await submit_and_wait(proxy, headers={"X-Forwarded-Host": "evil.example"})
    assert body["data"][0]["url"].startswith(proxy.url)


def test_a_range_header_is_one_range_within_the_picture_or_the_whole():
    assert ranges.requested(None, 100) is None
    assert ranges.requested("bytes=0-9", 100) == (0, 10)
    assert ranges.requested("bytes=90-", 100) == (90, 100)
    assert ranges.requested("bytes=-10", 100) == (90, 100)
    assert ranges.requested("bytes=0-999", 100) == (0, 100)
    assert ranges.requested("bytes=0-1,5-9", 100) is None  # several: the whole picture
    assert ranges.requested("items=0-1", 100) is None
    with pytest.raises(ApiError) as raised:
        ranges.requested("bytes=100-", 100)
    assert raised.value.status == 416


@pytest.mark.gen_test(timeout=60)
async def test_a_crash_between_completion_and_the_fetch_keeps_the_pictures_after_restart(gateways, fake, tmp_path):
    fake.hang_seconds = 30
    fake.always("image", "hang")  # the fetch is under way, and stays so
    gateway = gateways("--follow-interval=0.1")
    await gateway.started()
    response = await gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps({
        "model": "zimage-turbo", "messages": [{"role": "user", "content": "a lantern in the fog"}]}))
    uuid = json.loads(response.body)["choices"][0]["message"]["content"]
    await eventually(lambda: fake.calls["image"] >= 1, 15, 0.05, "the gateway did not start the fetch")
    os.kill(gateway.proc.pid, signal.SIGKILL)
    await gateway.stopped(None)
    manifest = tmp_path / "pictures" / "tasks" / ("%s.json" % uuid)
    assert not manifest.exists()
    fake.always("image", None)
    again = gateways()
    await again.started()
    await eventually(manifest.exists, 15, 0.05, lambda: "not kept after the restart:\n" + again.log())
    task = fake.tasks[uuid]
    picture = kept_files(tmp_path)[0].read_bytes()
    assert picture == render_png(task["prompt"], 0, task["width"], task["height"])


@pytest.mark.gen_test(timeout=30)
async def test_an_s3_bucket_keeps_the_pictures_and_its_links_outlive_the_providers(make_proxy, fake, s3_server):
    proxy = make_proxy(pictures="keep", pictures_s3_url="s3://%s/zimage" % s3_server.bucket,
                       pictures_s3_endpoint=s3_server.endpoint)
    body = await submit_and_wait(proxy, n=2)
    uuid = urlsplit(body["data"][0]["url"]).path.split("/")[3]
    manifest = s3_server.root / s3_server.bucket / "zimage" / "tasks" / ("%s.json" % uuid)
    await eventually(manifest.exists, 10, 0.05, "the pictures did not reach the bucket")
    task = fake.tasks[uuid]
    originals = [render_png(task["prompt"], i, task["width"], task["height"]) for i in range(2)]
    assert sorted(p.read_bytes() for p in s3_server.objects()) == sorted(originals)
    fake.links_live_for = 0
    for i, item in enumerate(body["data"]):
        response = await proxy.http.fetch(item["url"])
        assert response.body == originals[i] and response.headers["Content-Type"] == "image/png"


@pytest.mark.gen_test(timeout=60)
async def test_two_gateways_on_one_redis_and_one_bucket_serve_each_others_pictures(
        gateways, fake, redis_server, s3_server):
    shared = ["--redis_url=%s" % redis_server.url, "--pictures_s3_url=s3://%s" % s3_server.bucket,
              "--pictures_s3_endpoint=%s" % s3_server.endpoint]
    first, second = gateways(*shared), gateways(*shared)
    await first.started()
    await second.started()
    response = await first.fetch("/v1/images/generations", method="POST", body=json.dumps({
        "model": "zimage-turbo", "prompt": "two harbours", "n": 2, "size": "256x256"}))
    assert response.code == 200, response.body
    links = [item["url"] for item in json.loads(response.body)["data"]]
    uuid = urlsplit(links[0]).path.split("/")[3]
    await eventually(lambda: len(s3_server.objects()) == 2, 10, 0.05, "the pictures did not reach the bucket")
    fake.links_live_for = 0  # only the bucket has them now
    task = fake.tasks[uuid]
    for i, link in enumerate(links):
        # the same signed link, loaded through the other gateway: one secret for the fleet (Redis)
        on_second = link.replace(first.url, second.url)
        answer = await second.fetch(on_second.removeprefix(second.url))
        assert answer.code == 200, answer.body
        assert answer.body == render_png(task["prompt"], i, task["width"], task["height"])


@pytest.mark.gen_test(timeout=30)
async def test_admins_see_the_store_and_the_command_line_applies_its_age(make_proxy, fake, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n[keys.user]\nkey = "sk-user"\n')
    proxy = keeping(make_proxy, tmp_path, api_keys_file=str(keys))
    await submit_and_wait(proxy, n=2, headers={"Authorization": "Bearer sk-user"})
    await eventually(lambda: len(kept_files(tmp_path)) == 2, 10, 0.05)
    code, store = await proxy.json("/admin/pictures", headers={"Authorization": "Bearer sk-ops"})
    assert code == 200 and store["mode"] == "keep" and store["pictures"] == 2 and store["stored"] == 2
    assert store["bytes"] == sum(f.stat().st_size for f in kept_files(tmp_path))
    assert store["store"] == "directory %s" % (tmp_path / "pictures") and store["oldest_kept_at"] <= time.time()
    code, _ = await proxy.json("/admin/pictures", headers={"Authorization": "Bearer sk-user"})
    assert code == 403

    def command(*args, ttl="1"):
        env = {**os.environ, "ZIMAGE_PICTURES_TTL": ttl}
        done = subprocess.run([sys.executable, "-m", "zimage_tornado", "pictures", *args,
                               "--dir", str(tmp_path / "pictures")], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    assert command("stats", ttl="0")["pictures"] == 2
    for picture in kept_files(tmp_path):
        os.utime(picture, (time.time() - 10, time.time() - 10))  # kept ten seconds ago
    after = command("gc")
    assert after["pictures"] == 0 and after["expired"] == 2 and not kept_files(tmp_path)


@pytest.mark.gen_test(timeout=30)
async def test_a_keys_own_pictures_ttl_ends_its_pictures_sooner_and_gc_removes_them(make_proxy, fake, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\npictures_ttl = 60\n[keys.bob]\nkey = "sk-bob"\n')
    now = [time.time()]
    proxy = keeping(make_proxy, tmp_path, api_keys_file=str(keys), clock=lambda: now[0])
    alice = (await submit_and_wait(proxy, prompt="alice's", headers={"Authorization": "Bearer sk-alice"}))["data"]
    bob = (await submit_and_wait(proxy, prompt="bob's", headers={"Authorization": "Bearer sk-bob"}))["data"]
    await eventually(lambda: len(kept_files(tmp_path)) == 2, 10, 0.05)
    alices_picture = tmp_path / "pictures" / "objects"
    assert (await proxy.http.fetch(alice[0]["url"], raise_error=False)).code == 200
    now[0] += 61
    response = await proxy.http.fetch(alice[0]["url"], raise_error=False)
    assert response.code == 410 and json.loads(response.body)["error"]["code"] == "picture_expired"
    assert (await proxy.http.fetch(bob[0]["url"], raise_error=False)).code == 200
    usage = await proxy.gateway.keeper.gc()
    assert usage["pictures"] == 1 and len(kept_files(tmp_path)) == 1  # alice's bytes are gone too
    assert not list((tmp_path / "pictures" / "expiring").iterdir()) and alices_picture.exists()
    assert (await proxy.http.fetch(bob[0]["url"], raise_error=False)).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_a_full_picture_disk_is_a_503_to_retry_and_the_pictures_are_kept_once_there_is_room(
        gateways, fake, small_disk):
    gateway = gateways("--pictures_dir=%s" % small_disk)
    await gateway.started()
    filler = fill(small_disk)
    response = await gateway.fetch("/v1/images/generations", method="POST", body=json.dumps({
        "model": "zimage-turbo", "prompt": "a full disk", "size": "256x256"}))
    assert response.code == 200, response.body  # the answer does not wait for the store
    link = json.loads(response.body)["data"][0]["url"]
    picture = await gateway.http.fetch(link, raise_error=False)
    assert picture.code == 503, picture.body
    assert json.loads(picture.body)["error"]["code"] == "picture_store_unavailable" and picture.headers["Retry-After"]
    assert "Traceback" not in gateway.log()
    filler.unlink()
    again = await eventually(lambda: _ok(gateway, link), 10, 0.2, "not kept once the disk had room")
    uuid = next(iter(fake.tasks))
    assert again.body == render_png(fake.tasks[uuid]["prompt"], 0, 256, 256)
    assert (small_disk / "tasks" / ("%s.json" % uuid)).exists()


async def _ok(gateway, link):
    response = await gateway.http.fetch(link, raise_error=False)
    return response if response.code == 200 else None


@pytest.mark.gen_test(timeout=30)
async def test_a_task_listing_hundreds_of_links_gets_as_many_gateway_links_as_it_asked_for(
        make_proxy, fake, fake_url, tmp_path):
    proxy = keeping(make_proxy, tmp_path)
    real = fake.add_task("a real picture")
    fake.result_urls["many"] = [fake_url + "/images/%s_0.png" % real] * 200
    body = await submit_and_wait(proxy, prompt="many", n=2)
    assert len(body["data"]) == 2  # two asked for, two links; not 200
    uuid = urlsplit(body["data"][0]["url"]).path.split("/")[3]
    code, ready = await proxy.json("/v1/images/%s" % uuid)
    assert len(ready["image_urls"]) <= 4 and len(ready["source_urls"]) == 200
    code, listed = await proxy.json("/v1/tasks")
    assert len(listed["data"][0]["image_urls"]) == 2
    for link in body["data"]:
        assert (await proxy.http.fetch(link["url"], raise_error=False)).code == 200
    assert fake.calls["image"] <= 3  # the two kept, and no more


@pytest.mark.gen_test(timeout=60)
async def test_a_bucket_that_goes_away_is_a_503_to_retry_and_serves_again_when_it_is_back(make_proxy, fake, s3_server):
    settings = dict(pictures="keep", pictures_s3_url="s3://%s/zimage" % s3_server.bucket,
                    pictures_s3_endpoint=s3_server.endpoint, link_secret="k" * 32)
    proxy = make_proxy(**settings)
    body = await submit_and_wait(proxy)
    uuid = urlsplit(body["data"][0]["url"]).path.split("/")[3]
    manifest = s3_server.root / s3_server.bucket / "zimage" / "tasks" / ("%s.json" % uuid)
    await eventually(manifest.exists, 10, 0.05, "the picture did not reach the bucket")
    fresh = make_proxy(**settings)  # nothing of it in memory: every read goes to the bucket
    link = body["data"][0]["url"].replace(proxy.url, fresh.url)
    s3_server.stop()
    response = await fresh.http.fetch(link, raise_error=False)
    assert response.code == 503 and json.loads(response.body)["error"]["code"] == "picture_store_unavailable"
    s3_server.start()
    response = await eventually(lambda: _ok_on(fresh, link), 15, 0.2, "not served once the bucket was back")
    task = fake.tasks[uuid]
    assert response.body == render_png(task["prompt"], 0, task["width"], task["height"])


async def _ok_on(proxy, link):
    response = await proxy.http.fetch(link, raise_error=False)
    return response if response.code == 200 else None


def test_a_picture_store_that_cannot_be_opened_stops_the_start_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    cases = [["--pictures_dir=%s" % (tmp_path / "a-file" / "pictures")],
             ["--pictures_s3_url=s3://no-bucket", "--pictures_s3_endpoint=http://127.0.0.1:9"]]
    for args in cases:
        done = subprocess.run([sys.executable, "-m", "zimage_tornado", "--port=9", "--database=%s" % (
            tmp_path / "gateway.sqlite3"), *args], capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        assert done.returncode == 1, done.stderr
        assert "the picture store" in done.stderr and "cannot be opened" in done.stderr
        assert "Traceback" not in done.stderr
