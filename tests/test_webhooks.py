"""Webhooks: signed per Standard Webhooks (checked with the `standardwebhooks` package, as a
receiver would), durable, retried, disabled by 410, refused at submit when they cannot be kept,
delivered once by a fleet. The receiver is a real HTTP server in the test."""

from __future__ import annotations

import asyncio
import base64
import json
import signal

import pytest
from jsonschema import Draft202012Validator
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from tornado.web import Application, RequestHandler

from conftest import serve
from helpers import eventually

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes ...").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the secret before the rotation..").decode()
KEY_SECRET = "whsec_" + base64.b64encode(b"alice's very own webhook secret!").decode()
CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}
HANG = -1  # a receiver's scripted answer: take 5 s, then 200
WEBHOOKS = dict(webhook_secret=SECRET, webhook_hosts="127.0.0.1", webhook_retry_delays="0.2")


class Receiver:
    """Records each delivery; answers the scripted statuses in turn, then 200."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.arrived: list[float] = []  # loop time of each call
        self.statuses: list[int] = []
        self.url = ""

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.calls]

    def payloads(self, secret: str = SECRET) -> list[dict]:
        """Every delivery, verified with `secret` (raises if a signature does not verify)."""
        return [Webhook(secret).verify(body, headers) for headers, body in self.calls]


class ReceiverHandler(RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def post(self) -> None:
        self.receiver.calls.append(({k.lower(): v for k, v in self.request.headers.get_all()}, self.request.body))
        self.receiver.arrived.append(asyncio.get_running_loop().time())
        status = self.receiver.statuses.pop(0) if self.receiver.statuses else 200
        if status == HANG:
            await asyncio.sleep(5)
            status = 200
        self.set_status(status)
        if status == 429:
            self.set_header("Retry-After", "1")
        if status == 302:
            self.set_header("Location", self.request.full_url() + "&redirected=1")
        self.finish("thanks")


@pytest.fixture
def receiver(io_loop):
    hooks = Receiver()
    server, port = serve(Application([(r"/hook.*", ReceiverHandler, {"receiver": hooks})]))
    hooks.url = "http://127.0.0.1:%d/hook" % port
    yield hooks
    server.stop()


async def submit(proxy, body=None, headers=None):
    code, answer = await proxy.json("/v1/chat/completions", "POST", {**CHAT, **(body or {})}, headers=headers)
    assert code == 200, answer
    return answer["choices"][0]["message"]["content"]


@pytest.mark.gen_test(timeout=30)
async def test_a_completed_and_a_failed_task_each_call_back_once_signed(make_proxy, fake, receiver):
    proxy = make_proxy(**{**WEBHOOKS, "webhook_secret": SECRET + " " + OLD_SECRET})  # mid-rotation: two secrets
    done = await submit(proxy, {"webhook": receiver.url})
    await eventually(lambda: len(receiver.calls) == 1, 10)
    fake.outcome = "fail"
    failed = await submit(proxy, {"webhook": receiver.url + "?who=failed"})
    await eventually(lambda: len(receiver.calls) == 2, 10)
    # each signature verifies with either secret, as standard receivers check it
    completed_event, failed_event = receiver.payloads(SECRET)
    assert receiver.payloads(OLD_SECRET) == [completed_event, failed_event]
    assert completed_event["type"] == "task.completed" and failed_event["type"] == "task.failed"
    assert completed_event["timestamp"].endswith("Z")
    code, shown = await proxy.json("/v1/tasks/%s" % done)
    assert completed_event["data"] == shown  # the task as GET /v1/tasks/{uuid} shows it, with its image URLs
    assert shown["data"]["task"]["taskStatus"] == "completed" and "image" in json.dumps(shown)
    assert failed_event["data"]["data"]["task"]["taskStatus"] == "failed"
    headers = receiver.calls[0][0]
    assert headers["webhook-id"].startswith("msg_") and headers["webhook-timestamp"].isdigit()
    assert len(headers["webhook-signature"].split(" ")) == 2 and headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):  # a wrong secret does not verify
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(receiver.calls[0][1], headers)
    # /openapi.json describes what a receiver gets (OpenAPI 3.1 webhooks), and it is what came
    document = json.loads((await proxy.request("/openapi.json")).body)
    for event, (sent_headers, _) in zip((completed_event, failed_event), receiver.calls):
        operation = document["webhooks"][event["type"]]["post"]
        Draft202012Validator(operation["requestBody"]["content"]["application/json"]["schema"]).validate(event)
        assert {p["name"] for p in operation["parameters"]} <= set(sent_headers)
    # the delivery log, as the caller sees it
    code, log = await proxy.json("/v1/webhooks")
    assert code == 200 and [m["task_id"] for m in log["data"]] == [failed, done]
    assert {m["status"] for m in log["data"]} == {"delivered"} and log["data"][0]["attempts"] == 1
    metrics = (await proxy.request("/metrics")).body.decode()
    assert 'zimage_webhook_deliveries_total{outcome="delivered"} 2.0' in metrics
    await eventually(lambda: len(receiver.calls) == 2 and not proxy.gateway.deliverer._in_flight, 1)


@pytest.mark.gen_test(timeout=30)
async def test_a_receiver_failing_twice_gets_the_same_message_three_times(make_proxy, receiver):
    receiver.statuses = [500, 503]
    proxy = make_proxy(**WEBHOOKS)
    await submit(proxy, {"webhook": receiver.url})
    await eventually(lambda: len(receiver.calls) == 3, 10)
    ids = receiver.ids()
    assert len(set(ids)) == 1  # the same webhook-id on every attempt
    payloads = receiver.payloads()  # each attempt signed afresh, each verifies
    assert payloads[0] == payloads[2]
    code, log = await proxy.json("/v1/webhooks")
    message = log["data"][0]
    assert message["status"] == "delivered" and message["attempts"] == 3 and message["id"] == ids[0]
    assert message["last_status"] == 200 and message["next_attempt_at"] is None


@pytest.mark.gen_test(timeout=30)
async def test_a_redirect_is_not_followed_and_retry_after_is_honoured(make_proxy, receiver):
    receiver.statuses = [302, 429]
    proxy = make_proxy(**WEBHOOKS)
    await submit(proxy, {"webhook": receiver.url + "?a=1"})
    await eventually(lambda: len(receiver.calls) == 3, 10)
    assert len(set(receiver.ids())) == 1  # the same message three times, never to the redirect's target
    assert receiver.arrived[2] - receiver.arrived[1] >= 0.95  # the 429's Retry-After: 1, not the 0.2 s schedule
    assert receiver.arrived[1] - receiver.arrived[0] < 0.9  # the 302: the schedule's 0.2 s
    code, log = await proxy.json("/v1/webhooks")
    assert log["data"][0]["status"] == "delivered" and log["data"][0]["attempts"] == 3


@pytest.mark.gen_test(timeout=30)
async def test_a_receiver_that_never_recovers_is_given_up_after_max_attempts(make_proxy, receiver):
    receiver.statuses = [500] * 10
    proxy = make_proxy(**WEBHOOKS, webhook_max_attempts=3)
    await submit(proxy, {"webhook": receiver.url})
    await eventually(lambda: len(receiver.calls) == 3, 10)
    code, log = await proxy.json("/v1/webhooks?status=failed")
    assert log["data"][0]["attempts"] == 3 and "gave up after 3 attempts" in log["data"][0]["last_error"]
    # a 4xx other than 408 and 429 is the receiver's refusal: not retried
    receiver.statuses = [400]
    await submit(proxy, {"webhook": receiver.url})
    await eventually(lambda: len(receiver.calls) == 4, 10)
    code, log = await proxy.json("/v1/webhooks?status=failed")
    assert len(log["data"]) == 2 and log["data"][0]["last_error"] == "HTTP 400" and log["data"][0]["attempts"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_410_disables_the_url_for_the_key_until_an_admin_retries(make_proxy, fake, receiver, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\n[keys.ops]\nkey = "sk-ops"\nadmin = true\n')
    alice, ops = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-ops"}
    proxy = make_proxy(**WEBHOOKS, api_keys_file=str(keys))
    receiver.statuses = [410]
    await submit(proxy, {"webhook": receiver.url}, alice)
    await eventually(lambda: len(receiver.calls) == 1, 10)
    code, log = await proxy.json("/v1/webhooks", headers=alice)
    await eventually(lambda: proxy.gateway.deliverer.outcomes["disabled"] == 1, 5)
    code, log = await proxy.json("/v1/webhooks", headers=alice)
    assert log["data"][0]["status"] == "disabled" and log["data"][0]["last_status"] == 410
    tasks_before = len(fake.tasks)
    code, refused = await proxy.json("/v1/chat/completions", "POST", {**CHAT, "webhook": receiver.url}, headers=alice)
    assert code == 400 and refused["error"]["code"] == "webhook_url_disabled"
    assert len(fake.tasks) == tasks_before  # nothing reached the upstream
    assert (await proxy.json("/v1/chat/completions", "POST", {**CHAT, "webhook": receiver.url}, headers=ops))[0] \
        == 200  # disabled for alice only
    # the admin's log, then a retry: sent again, and the URL is alice's again
    code, admin = await proxy.json("/admin/webhooks?key=alice&status=disabled", headers=ops)
    assert code == 200 and len(admin["data"]) == 1 and admin["data"][0]["key"] == "alice"
    assert (await proxy.json("/admin/webhooks", headers=alice))[0] == 403
    message_id = admin["data"][0]["id"]
    code, retried = await proxy.json("/admin/webhooks/%s/retry" % message_id, "POST", headers=ops)
    assert code == 202 and retried["status"] == "pending"
    await eventually(lambda: receiver.ids().count(message_id) == 2, 10)
    await submit(proxy, {"webhook": receiver.url}, alice)
    assert (await proxy.json("/admin/webhooks/msg_nope/retry", "POST", headers=ops))[0] == 404
    assert (await proxy.json("/admin/webhooks/..%2f/retry", "POST", headers=ops))[0] in (400, 404)


@pytest.mark.gen_test(timeout=30)
async def test_webhooks_that_cannot_be_kept_are_refused_before_the_upstream(make_proxy, fake, receiver, tmp_path):
    secretless = make_proxy(webhook_hosts="127.0.0.1")
    code, answer = await secretless.json("/v1/chat/completions", "POST", {**CHAT, "webhook": receiver.url})
    assert code == 400 and answer["error"]["code"] == "webhook_secret_not_configured"
    proxy = make_proxy(webhook_secret=SECRET)  # no webhook_hosts: loopback is not a receiver
    for url, code_expected in (("http://127.0.0.1:9/hook", "invalid_webhook_url"),
                               ("http://localhost/hook", "invalid_webhook_url"),
                               ("http://[::1]/hook", "invalid_webhook_url"),
                               ("http://169.254.169.254/latest", "invalid_webhook_url"),
                               ("http://10.0.0.1/x", "invalid_webhook_url"),
                               ("ftp://example.com/x", "invalid_webhook_url"),
                               ("http://exa mple.com/", "invalid_webhook_url"),
                               ("http://no-such-host.invalid/hook", "invalid_webhook_url")):
        code, answer = await proxy.json("/v1/images/generations", "POST", {"prompt": "x", "webhook": url})
        assert code == 400 and answer["error"]["code"] == code_expected, (url, answer)
    for events in (["task.finished"], [], "task.completed", [1]):
        code, answer = await proxy.json("/v1/chat/completions", "POST", {
            **CHAT, "webhook": "https://example.com/hook", "webhook_events": events})
        assert code == 400 and answer["error"]["param"] == "webhook_events", events
    code, answer = await proxy.json("/v1/chat/completions", "POST", {**CHAT, "webhook_events": ["task.failed"]})
    assert code == 400 and answer["error"]["code"] == "missing_value"
    assert fake.tasks == {}  # not one reached the upstream


@pytest.mark.gen_test(timeout=30)
async def test_a_keys_default_webhook_and_own_secret_and_progress_events(make_proxy, fake, receiver, tmp_path):
    fake.reads_to_complete = 4
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\nwebhook_url = "%s"\nwebhook_secret = "%s"\n'
                    % (receiver.url, KEY_SECRET))
    alice = {"Authorization": "Bearer sk-alice"}
    proxy = make_proxy(**WEBHOOKS, api_keys_file=str(keys), poll_interval=0.05)
    uuid = await submit(proxy, {"webhook_events": ["task.progress", "task.completed"]}, alice)
    await eventually(lambda: any(b'"task.completed"' in body for _, body in receiver.calls), 10)
    events = receiver.payloads(KEY_SECRET)  # signed with alice's own secret, not the setting's
    types = [e["type"] for e in events]
    assert types[-1] == "task.completed" and set(types[:-1]) == {"task.progress"} and len(types) >= 2
    states = [(e["data"]["data"]["task"]["taskStatus"], e["data"]["data"]["task"].get("progress"))
              for e in events[:-1]]
    assert len(states) == len(set(states))  # only when the status or progress changed
    assert all(e["data"]["data"]["task"]["uuid"] == uuid for e in events if "uuid" in e["data"]["data"]["task"])


@pytest.mark.gen_test(timeout=30)
async def test_a_task_nobody_waits_on_that_never_ends_calls_back_expired(make_proxy, fake, receiver):
    fake.outcome = "never"
    proxy = make_proxy(**WEBHOOKS, follow_budget=0.5, follow_interval=0.1)
    uuid = await submit(proxy, {"webhook": receiver.url, "webhook_events": ["task.expired"]})
    await eventually(lambda: len(receiver.calls) == 1, 10)
    (event,) = receiver.payloads()
    assert event["type"] == "task.expired" and event["data"]["data"]["task"]["taskStatus"] == "expired"
    assert event["data"]["data"]["uuid"] == uuid


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("when", ["a retry is pending", "an attempt is in flight"])
async def test_a_message_outlives_a_killed_gateway(gateways, receiver, when):
    env = {"ZIMAGE_WEBHOOK_SECRET": SECRET, "ZIMAGE_WEBHOOK_HOSTS": "127.0.0.1",
           "ZIMAGE_WEBHOOK_RETRY_DELAYS": "1.5"}
    receiver.statuses = [500] if when == "a retry is pending" else [HANG]
    first = gateways(env=env)
    await first.started()
    response = await first.fetch("/v1/chat/completions", method="POST",
                                 body=json.dumps({**CHAT, "webhook": receiver.url}))
    assert response.code == 200
    await eventually(lambda: len(receiver.calls) == 1, 10)
    if when == "a retry is pending":
        async def retry_recorded():
            page = json.loads((await first.fetch("/v1/webhooks")).body)["data"]
            return page and page[0]["attempts"] == 1 and page[0]["status"] == "pending"
        await eventually(retry_recorded, 10)
    first.proc.send_signal(signal.SIGKILL)  # only the database knows the message now
    first.proc.wait(10)
    second = gateways(env=env)
    await second.started()
    await eventually(lambda: len(receiver.calls) == 2, 10)  # not a lease (30 s) later: nobody else could send it
    assert len(set(receiver.ids())) == 1 and receiver.payloads()[0] == receiver.payloads()[1]
    second.kill()


@pytest.mark.gen_test(timeout=90)
async def test_two_fleet_instances_deliver_each_message_once(gateways, receiver, redis_server):
    env = {"ZIMAGE_WEBHOOK_SECRET": SECRET, "ZIMAGE_WEBHOOK_HOSTS": "127.0.0.1", "ZIMAGE_REDIS_URL": redis_server.url}
    fleet = [gateways(env=env), gateways(env=env)]
    for gateway in fleet:
        await gateway.started()
    for i in range(10):  # submitted to either; both poll, wait and deliver
        response = await fleet[i % 2].fetch("/v1/chat/completions", method="POST", body=json.dumps(
            {**CHAT, "prompt": "fleet %d" % i, "webhook": receiver.url, "wait": i % 3 == 0}))
        assert response.code == 200
    await eventually(lambda: len(receiver.calls) >= 10, 20)
    await asyncio.sleep(1.5)  # time for a duplicate to arrive, if one would
    payloads = receiver.payloads()
    assert len(receiver.calls) == 10 and len(set(receiver.ids())) == 10
    assert sorted(p["type"] for p in payloads) == ["task.completed"] * 10
    response = await fleet[1].fetch("/v1/webhooks?limit=100")
    assert len(json.loads(response.body)["data"]) == 10  # the fleet's log, from either instance


def test_secrets_are_checked_at_start_and_keys_secret_makes_a_good_one(capsys, tmp_path):
    from zimage_tornado.config import Settings
    from zimage_tornado.keys_cli import main
    from zimage_tornado.tenants import load_keys

    assert main(["secret"]) == 0
    made = capsys.readouterr().out.strip()
    assert Settings(webhook_secret=made).webhook_secrets  # it parses, and signs
    for bad in ("secret", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match="webhook_secret"):
            Settings(webhook_secret=bad)
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-a"\nwebhook_secret = "whsec_x"\n')
    with pytest.raises(ValueError, match=r"\[keys.alice\]"):
        load_keys("", str(keys))
    keys.write_text('[keys.alice]\nkey = "sk-a"\nwebhook_url = "ftp://example.com"\n')
    with pytest.raises(ValueError, match="webhook_url"):
        load_keys("", str(keys))
    with pytest.raises(ValueError, match="webhook_retry_delays"):
        Settings(webhook_retry_delays="soon")


@pytest.mark.gen_test(timeout=30)
async def test_with_public_url_a_completed_webhook_gives_links_that_outlive_the_providers(
        make_proxy, fake, receiver, tmp_path):
    shared = dict(WEBHOOKS, pictures="keep", pictures_dir=str(tmp_path / "pictures"), link_secret="s" * 32)
    public = make_proxy(**shared)  # the address receivers are given: another gateway on the same store
    proxy = make_proxy(**shared, public_url=public.url)
    uuid = await submit(proxy, {"webhook": receiver.url, "batch_size": 2})
    await eventually(lambda: len(receiver.calls) == 1, 10)
    event = receiver.payloads()[0]
    assert event["type"] == "task.completed" and len(event["image_urls"]) == 2
    assert event["data"]["data"]["task"]["taskStatus"] == "completed"  # the provider's document, unchanged
    await eventually(lambda: (tmp_path / "pictures" / "tasks" / ("%s.json" % uuid)).exists(), 10)
    fake.links_live_for = 0
    for link in event["image_urls"]:  # a late receiver: no key, the provider's links dead
        assert link.startswith(public.url + "/v1/images/%s/" % uuid)
        response = await proxy.http.fetch(link, raise_error=False)
        assert response.code == 200 and response.body.startswith(b"\x89PNG")
