"""GET /openapi.json is valid OpenAPI 3.1, and real answers of every endpoint match it."""

import json
from urllib.parse import quote

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from zimage_tornado import webhooks

SEEN: set[tuple[str, str, str]] = set()


class Contract:
    def __init__(self, document):
        self.document = document
        self.registry = Registry().with_resource("urn:api", Resource(document, DRAFT202012))

    def check(self, template, method, response):
        operation = self.document["paths"][template][method.lower()]
        documented = operation["responses"].get(str(response.code))
        assert documented is not None, "%s %s answered %d, which is not documented" % (method, template,
                                                                                     response.code)
        SEEN.add((template, method.lower(), str(response.code)))
        content = documented.get("content", {})
        media = response.headers.get("Content-Type", "").split(";")[0]
        if not content:
            return
        assert media in content, "%s %s %d: %s is not documented" % (method, template, response.code, media)
        if media != "application/json":
            return
        pointer = "/paths/%s/%s/responses/%d/content/application~1json/schema" % (
            template.replace("~", "~0").replace("/", "~1"), method.lower(), response.code)
        validator = Draft202012Validator({"$ref": "urn:api#" + quote(pointer, safe="/~")}, registry=self.registry)
        errors = list(validator.iter_errors(json.loads(response.body)))
        assert not errors, "%s %s %d: %s" % (method, template, response.code, errors[0].message)


@pytest.mark.gen_test
async def test_the_document_is_valid_openapi_3_1(proxy):
    response = await proxy.request("/openapi.json")
    assert response.code == 200
    document = json.loads(response.body)
    assert document["openapi"].startswith("3.1")
    validate_openapi(document)
    # every webhook event a submit may ask for is described for its receivers
    assert list(document["webhooks"]) == list(webhooks.EVENTS)
    assert document["components"]["schemas"]["GenerationParameters"]["properties"]["webhook_events"]["items"][
        "enum"] == list(webhooks.EVENTS)


@pytest.mark.gen_test(timeout=30)
async def test_real_answers_match_the_document(make_proxy, fake, tmp_path):
    proxy = make_proxy(poll_interval=0.02, max_attempts=5, max_body_bytes=5000)
    contract = Contract(json.loads((await proxy.request("/openapi.json")).body))

    async def call(template, path, method="GET", body=None, **kw):
        response = await proxy.request(path, method, body, **kw)
        contract.check(template, method, response)
        return response

    chat = {"model": "zimage-turbo", "prompt": "a fox"}
    await call("/", "/")
    await call("/", "/", headers={"Accept": "text/html"})
    await call("/health", "/health")
    await call("/health/ready", "/health/ready")
    await call("/metrics", "/metrics")
    await call("/playground", "/playground")
    await call("/favicon.ico", "/favicon.ico")
    await call("/openapi.json", "/openapi.json")
    await call("/v1/models", "/v1/models")
    await call("/v1/models/{model}", "/v1/models/zimage-turbo")
    await call("/v1/models/{model}", "/v1/models/nope")
    ok = await call("/v1/chat/completions", "/v1/chat/completions", "POST", chat)
    task_uuid = json.loads(ok.body)["choices"][0]["message"]["content"]
    await call("/v1/chat/completions", "/v1/chat/completions", "POST", {**chat, "steps": 0})
    await call("/v1/chat/completions", "/v1/chat/completions", "POST", {**chat, "prompt": "x" * 6000})
    await call("/v1/chat/completions", "/v1/chat/completions", "POST", {**chat, "wait": True})
    await call("/v1/chat/completions", "/v1/chat/completions", "POST", {**chat, "stream": True})
    await call("/v1/chat/completions", "/v1/chat/completions", "POST", {  # an image tool offered: called
        "model": "zimage-turbo", "messages": [{"role": "user", "content": "a fox"}],
        "tools": [{"type": "function", "function": {"name": "generate_image", "parameters": {
            "type": "object", "properties": {"prompt": {"type": "string"}}}}}]})
    for fault in ("429", "500"):
        fake.inject("generate", fault)
        await call("/v1/chat/completions", "/v1/chat/completions", "POST", chat)
    await call("/v1/completions", "/v1/completions", "POST", {"model": "zimage-turbo", "prompt": "a fox"})
    await call("/v1/completions", "/v1/completions", "POST", {"model": "zimage-turbo", "prompt": ["a fox"],
                                                              "stream": True})
    await call("/v1/completions", "/v1/completions", "POST", {"model": "zimage-turbo", "prompt": 7})
    await call("/v1/images/generations", "/v1/images/generations", "POST", {"prompt": "a fox", "n": 2})
    await call("/v1/images/generations", "/v1/images/generations", "POST",
               {"prompt": "a fox", "size": "64x64", "response_format": "b64_json"})
    await call("/v1/images/generations", "/v1/images/generations", "POST", {"prompt": "a fox", "n": 99})
    await call("/v1/tasks/{uuid}", "/v1/tasks/%s" % task_uuid)
    await call("/v1/tasks/{uuid}", "/v1/tasks/bad.id")
    await call("/v1/tasks/{uuid}", "/v1/tasks/00000000-0000-4000-8000-00000000dead")
    await call("/v1/images/{uuid}", "/v1/images/%s" % task_uuid)
    await call("/v1/images/{uuid}", "/v1/images/bad.id")
    await call("/v1/images/{uuid}/{index}", "/v1/images/%s/0" % task_uuid)
    await call("/v1/images/{uuid}/{index}", "/v1/images/%s/7" % task_uuid)
    await call("/v1/images/{uuid}/{index}", "/v1/images/%s/x" % task_uuid)
    await call("/v1/images/generations/{uuid}", "/v1/images/generations/%s?response_format=b64_json" % task_uuid)
    await call("/v1/images/generations/{uuid}", "/v1/images/generations/%s?output_format=gif" % task_uuid)
    kept = make_proxy(poll_interval=0.02, max_attempts=5, pictures="keep", pictures_dir=str(tmp_path / "pictures"))
    link = json.loads((await kept.request("/v1/images/generations", "POST", {"prompt": "a fox"})).body)["data"][0]
    for headers in ({}, {"Range": "bytes=0-9"}, {"Range": "bytes=99999999-"}):
        response = await kept.http.fetch(link["url"], headers=headers, raise_error=False)
        contract.check("/v1/images/{uuid}/{index}", "GET", response)
    forged = await kept.http.fetch(link["url"][:-3] + "abc", raise_error=False)
    contract.check("/v1/images/{uuid}/{index}", "GET", forged)
    await call("/v1/images/{uuid}", "/v1/images/00000000-0000-4000-8000-00000000dead")
    fake.outcome = "never"
    running = json.loads((await call("/v1/chat/completions", "/v1/chat/completions", "POST", chat)).body)
    running = running["choices"][0]["message"]["content"]
    await call("/v1/images/{uuid}", "/v1/images/%s?wait=false" % running)
    await call("/v1/images/{uuid}", "/v1/images/%s" % running)  # 504
    await call("/v1/images/generations", "/v1/images/generations", "POST", {"prompt": "slow"})  # 504
    fake.outcome = "fail"
    failed = json.loads((await call("/v1/chat/completions", "/v1/chat/completions", "POST", chat)).body)
    await call("/v1/images/{uuid}", "/v1/images/%s" % failed["choices"][0]["message"]["content"])  # 502
    await call("/v1/images/generations", "/v1/images/generations", "POST", {"prompt": "doomed"})  # 502
    proxy.gateway.shutting_down = True
    await call("/health/ready", "/health/ready")
    await call("/v1/models", "/v1/models")
    secured = make_proxy(api_keys="k")
    response = await secured.request("/v1/models")
    contract.check("/v1/models", "GET", response)
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n[keys.user]\nkey = "sk-user"\n')
    admin = make_proxy(api_keys_file=str(keys))
    ops = {"Authorization": "Bearer sk-ops"}
    await admin.request("/v1/chat/completions", "POST", chat, headers=ops)
    for headers in (ops, {"Authorization": "Bearer sk-user"}, {}):
        contract.check("/admin/usage", "GET", await admin.request("/admin/usage", headers=headers))
    contract.check("/admin/usage", "GET", await admin.request("/admin/usage?since=yesterday", headers=ops))
    contract.check("/admin/tasks", "GET", await admin.request("/admin/tasks?limit=5", headers=ops))
    contract.check("/admin/tasks", "GET", await admin.request("/admin/tasks?status=done", headers=ops))  # 400
    contract.check("/admin/tasks.csv", "GET", await admin.request("/admin/tasks.csv?status=submitted", headers=ops))
    contract.check("/admin/usage.csv", "GET", await admin.request("/admin/usage.csv", headers=ops))
    contract.check("/admin/keys", "GET", await admin.request("/admin/keys", headers=ops))
    contract.check("/admin/pictures", "GET", await admin.request("/admin/pictures", headers=ops))
    contract.check("/admin", "GET", await admin.request("/admin"))
    contract.check("/v1/tasks", "GET", await admin.request("/v1/tasks?limit=2", headers=ops))
    contract.check("/v1/tasks", "GET", await admin.request("/v1/tasks?status=nope", headers=ops))
    mine = json.loads((await admin.request("/v1/tasks", headers=ops)).body)["data"][0]["id"]
    contract.check("/v1/tasks/{uuid}/events", "GET", await admin.request("/v1/tasks/%s/events" % mine, headers=ops))
    contract.check("/v1/images/generations", "POST", await admin.request(
        "/v1/images/generations", "POST", {"prompt": "soon"}, headers={**ops, "Prefer": "wait=0"}))
    contract.check("/v1/webhooks", "GET", await admin.request("/v1/webhooks", headers=ops))
    contract.check("/v1/webhooks", "GET", await admin.request("/v1/webhooks?status=lost", headers=ops))  # 400
    contract.check("/admin/webhooks", "GET", await admin.request("/admin/webhooks?status=failed", headers=ops))
    contract.check("/admin/webhooks/{id}/retry", "POST", await admin.request("/admin/webhooks/msg_x/retry", "POST",
                                                                            headers=ops))  # 404
    assert {template for template, _, _ in SEEN} == set(contract.document["paths"])  # every path exercised
    assert len(SEEN) >= 30


@pytest.mark.gen_test
async def test_the_document_names_every_route_and_no_other(proxy):
    from zimage_tornado.web.routes import ENDPOINTS
    document = json.loads((await proxy.request("/openapi.json")).body)
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert documented == {(method, path) for method, path, _ in ENDPOINTS}
    for method, path, description in ENDPOINTS:
        assert document["paths"][path][method.lower()]["summary"] == description
