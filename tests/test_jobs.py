"""Jobs without holding a connection: the caller's task list, one task's event stream, and
`Prefer: wait` (RFC 7240) on submits."""

import json

import pytest

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}
KEYS = '[keys.alice]\nkey = "sk-alice"\n[keys.bob]\nkey = "sk-bob"\n[keys.ops]\nkey = "sk-ops"\nadmin = true\n'
ALICE, BOB, OPS = ({"Authorization": "Bearer sk-%s" % n} for n in ("alice", "bob", "ops"))


def uuid_of(response):
    return json.loads(response.body)["choices"][0]["message"]["content"]


@pytest.mark.gen_test(timeout=30)
async def test_the_task_list_pages_with_after_and_shows_only_the_callers_tasks(make_proxy, fake, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    proxy = make_proxy(api_keys_file=str(keys), database=str(tmp_path / "db.sqlite3"), follow_budget=0)
    mine = [uuid_of(await proxy.request("/v1/chat/completions", "POST", {**CHAT, "prompt": "mine %d" % i},
                                        headers=ALICE)) for i in range(5)]
    theirs = uuid_of(await proxy.request("/v1/chat/completions", "POST", CHAT, headers=BOB))
    code, first = await proxy.json("/v1/tasks?limit=2", headers=ALICE)
    assert code == 200 and first["object"] == "list" and first["has_more"] is True
    assert [t["id"] for t in first["data"]] == mine[::-1][:2] and first["last_id"] == mine[3]
    seen = [t["id"] for t in first["data"]]
    page = first
    while page["has_more"]:
        code, page = await proxy.json("/v1/tasks?limit=2&after=%s" % page["last_id"], headers=ALICE)
        seen += [t["id"] for t in page["data"]]
    assert seen == mine[::-1] and theirs not in seen  # every one once, newest first, none of bob's
    assert (await proxy.json("/v1/tasks?after=%s" % theirs, headers=ALICE))[0] == 400  # not a cursor of hers
    for limit in ("0", "9" * 5000, "\u00b2"):  # a page size out of range, of thousands of digits, not ASCII
        code, refused = await proxy.json("/v1/tasks?limit=%s" % limit, headers=ALICE)
        assert code == 400 and refused["error"]["param"] == "limit"
    code, admin = await proxy.json("/v1/tasks?key=bob", headers=OPS)
    assert [t["id"] for t in admin["data"]] == [theirs] and admin["data"][0]["prompt"] == "a lighthouse"
    code, filtered = await proxy.json("/v1/tasks?status=completed", headers=ALICE)
    assert code == 200 and filtered["data"] == []


@pytest.mark.gen_test(timeout=30)
async def test_the_event_stream_reports_progress_and_ends_with_completed(make_proxy, fake):
    fake.reads_to_complete = 4
    proxy = make_proxy(poll_interval=0.05)
    uuid = uuid_of(await proxy.request("/v1/chat/completions", "POST", CHAT))
    response = await proxy.request("/v1/tasks/%s/events" % uuid)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = [block.split("\n") for block in response.body.decode().split("\n\n") if block.startswith("event:")]
    names = [lines[0][len("event: "):] for lines in events]
    assert names[0] == "progress" and names[-1] == "completed" and set(names[:-1]) == {"progress"}
    last = json.loads(events[-1][1][len("data: "):])
    assert last["uuid"] == uuid and last["status"] == "completed" and last["image_urls"]


@pytest.mark.gen_test(timeout=30)
async def test_the_event_stream_of_a_failed_task_ends_with_failed(make_proxy, fake):
    fake.outcome = "fail"
    proxy = make_proxy(poll_interval=0.05)
    uuid = uuid_of(await proxy.request("/v1/chat/completions", "POST", CHAT))
    body = (await proxy.request("/v1/tasks/%s/events" % uuid)).body.decode()
    assert body.rstrip().split("\n\n")[-1].startswith("event: failed")


@pytest.mark.gen_test(timeout=30)
async def test_prefer_wait_answers_202_with_location_or_the_pictures(make_proxy, fake):
    fake.seconds_to_complete = 3
    proxy = make_proxy(poll_interval=0.1, max_attempts=100)
    slow = await proxy.request("/v1/images/generations", "POST", {"prompt": "slow"}, headers={"Prefer": "wait=1"})
    assert slow.code == 202, slow.body
    body = json.loads(slow.body)
    assert body["object"] == "task" and body["status"] in ("pending", "processing")
    assert slow.headers["Location"] == "/v1/images/generations/%s" % body["id"]  # where the answer will be
    assert slow.headers["Preference-Applied"] == "wait=1"
    fake.seconds_to_complete = 0.3
    quick = await proxy.request("/v1/images/generations", "POST", {"prompt": "quick"}, headers={"Prefer": "wait=1"})
    assert quick.code == 200 and json.loads(quick.body)["data"][0]["url"]
    chat = await proxy.request("/v1/chat/completions", "POST", CHAT, headers={"Prefer": "respond-async, wait=1"})
    assert chat.code == 200 and "![image 1](" in json.loads(chat.body)["choices"][0]["message"]["content"]
    plain = await proxy.request("/v1/chat/completions", "POST", CHAT)  # without it: the uuid at once, as before
    assert plain.code == 200 and "![" not in uuid_of(plain)
