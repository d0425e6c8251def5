"""GET /v1/tasks/<uuid>: the upstream's task, passed through."""

import pytest


@pytest.mark.gen_test
async def test_running_task_is_passed_through(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy()
    task_uuid = await proxy.submit()
    code, body = await proxy.json("/v1/tasks/%s" % task_uuid)
    assert code == 200
    assert body["success"] is True
    assert body["data"]["task"]["taskStatus"] == "pending"
    assert body["data"]["task"]["queuePosition"] == 1


@pytest.mark.gen_test
async def test_unknown_task_is_404(proxy):
    code, body = await proxy.json("/v1/tasks/00000000-0000-4000-8000-00000000dead")
    assert code == 404
    assert body["error"]["code"] == "task_not_found"


@pytest.mark.parametrize("fault,status", [("500", 502), ("garbage", 502), ("503", 502), ("429", 429)])
@pytest.mark.gen_test
async def test_upstream_failures_are_mapped(proxy, fake, fault, status):
    fake.always("task", fault)  # every read fails, the follow-up's of the new task included
    task_uuid = await proxy.submit()
    code, body = await proxy.json("/v1/tasks/%s" % task_uuid)
    assert code == status
    assert body["error"]["type"] == "upstream_error"
    assert body["uuid"] == task_uuid
