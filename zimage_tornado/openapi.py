"""The OpenAPI 3.1 description of every endpoint, served at GET /openapi.json.

Its paths and summaries come from the route table (web/routes.py); the rest is kept by hand next
to the code it describes. tests/test_openapi.py checks it is a valid OpenAPI 3.1 document, that it
names every route and no other, and that real answers of every endpoint match it."""

from __future__ import annotations

from typing import Any, Iterable

from zimage_tornado import SERVICE_NAME, __version__
from zimage_tornado.webhooks import EVENTS


def ref(name: str) -> dict[str, str]:
    return {"$ref": "#/components/schemas/%s" % name}


def json_response(description: str, schema: dict[str, Any], headers: tuple[str, ...] = ()) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = {name: {"$ref": "#/components/headers/%s" % name} for name in headers}
    return response


def error(description: str, *headers: str) -> dict[str, Any]:
    return json_response(description, ref("Error"), headers)


COMMON_ERRORS = {
    "401": error("Missing or wrong API key (only when api_keys are set)", "WWW-Authenticate"),
    "503": error("The gateway is shutting down, or too many clients wait", "Retry-After"),
}
UPSTREAM_ERRORS = {
    "429": error("The upstream is rate-limiting", "Retry-After"),
    "502": error("The upstream failed, answered garbage, or could not be reached"),
    "504": error("The upstream did not answer in time"),
}
ACCEPTED_ERRORS = {
    "502": error("The task failed, or the upstream failed (x-should-retry: false once accepted)", "x-should-retry"),
    "503": error("Shutting down or too many waiters (x-should-retry: false once accepted)",
                 "Retry-After", "x-should-retry"),
    "504": error("Still running when the wait ended (x-should-retry: false)", "x-should-retry"),
}
PREFER = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
          "description": "RFC 7240 wait=N: answer within N seconds; 202 and Location if the task still runs"}
PREFERRED_WAIT_RAN_OUT = {"202": {
    "description": "Prefer: wait=N ran out: the task runs on (Location: /v1/tasks/{uuid})",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskPending"}}}}}
TASK_UUID = {"name": "uuid", "in": "path", "required": True,
             "description": "A task uuid: 1 to 64 letters, digits or '-'", "schema": {"type": "string"}}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "The same key within idempotency_ttl returns the same task",
                   "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
NULLABLE_STRING = {"type": ["string", "null"]}
NUMBER_OR_NULL = {"type": ["number", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "OpenAI's error envelope; long-poll errors add uuid, status and details beside it",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": NULLABLE_STRING, "code": NULLABLE_STRING},
            },
            "uuid": {"type": "string"},
            "status": {"type": "string"},
            "reason": {"type": "string"},
            "last_status": NULLABLE_STRING,
            "progress": NUMBER_OR_NULL,
            "upstream_error": {"type": "string"},
            "task_info": {"type": "object"},
        },
    },
    "GenerationParameters": {
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "minLength": 1},
            "negative_prompt": {"type": "string"},
            "batch_size": {"type": "integer", "minimum": 1},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "steps": {"type": "integer", "minimum": 1},
            "cfg_scale": {"type": "number", "minimum": 0},
            "webhook": {"type": "string", "format": "uri", "maxLength": 2048,
                        "description": "Called back (signed, Standard Webhooks) when the task ends"},
            "webhook_events": {"type": "array", "minItems": 1, "items": {"enum": list(EVENTS)},
                "description": "Default: task.completed, task.failed, task.expired"},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "description": "Generation parameters are read from extra_body and from the top level; extra_body wins.",
        "allOf": [ref("GenerationParameters")],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "object", "properties": {
                "role": {"type": "string"},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}},
            "extra_body": {"allOf": [ref("GenerationParameters")], "properties": {"wait": {"type": "boolean"}}},
            "stream": {"type": "boolean"},
            "wait": {"type": "boolean"},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string", "pattern": "^chatcmpl-"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {"type": "object", "required": ["role", "content"], "properties": {
                        "role": {"const": "assistant"},
                        "content": {"type": ["string", "null"],
                                    "description": "The task uuid, or markdown images in wait mode; null with "
                                                   "tool_calls"},
                        "task_uuid": {"type": "string"},
                        "tool_calls": {"type": "array", "description": "A request offering an image tool "
                                                                       "(generate_image, image_tools): one call of "
                                                                       "it with the prompt; no job is made",
                                       "items": {"type": "object", "required": ["id", "type", "function"],
                                                 "properties": {"id": {"type": "string"},
                                                                "type": {"const": "function"},
                                                                "function": {"type": "object",
                                                                             "required": ["name", "arguments"],
                                                                             "properties": {
                                                                                 "name": {"type": "string"},
                                                                                 "arguments": {"type": "string"}}}}}}}},
                    "finish_reason": {"enum": ["stop", "tool_calls"]}}}},
            "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                        "completion_tokens": {"type": "integer"},
                                                        "total_tokens": {"type": "integer"}}},
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "allOf": [ref("GenerationParameters")],
        "properties": {"model": {"type": "string"},
                       "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                       "stream": {"type": "boolean"}, "wait": {"type": "boolean"},
                       "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}},
    },
    "TextCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string", "pattern": "^cmpl-"}, "object": {"const": "text_completion"},
            "created": {"type": "integer"}, "model": {"type": "string"}, "task_uuid": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["index", "text", "finish_reason"],
                "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                               "finish_reason": {"const": "stop"}}}},
            "usage": {"type": "object"},
        },
    },
    "ImagesRequest": {
        "type": "object",
        "required": ["prompt"],
        "allOf": [ref("GenerationParameters")],
        "properties": {
            "model": {"type": "string"},
            "n": {"type": "integer", "minimum": 1},
            "size": {"type": "string", "description": "WIDTHxHEIGHT, or auto"},
            "response_format": {"enum": ["url", "b64_json"]},
        },
    },
    "ImagesResponse": {
        "type": "object",
        "required": ["created", "data"],
        "properties": {
            "created": {"type": "integer"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string"}, "b64_json": {"type": "string"}},
                "minProperties": 1}},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    },
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}},
    "ImagesReady": {
        "type": "object",
        "required": ["uuid", "status", "image_urls", "task_info"],
        "properties": {"uuid": {"type": "string"}, "status": {"const": "completed"},
                       "image_urls": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                      "description": "pictures=keep: the gateway's signed links"},
                       "source_urls": {"type": "array", "items": {"type": "string"},
                                       "description": "pictures=keep: the provider's own links"},
                       "task_info": {"type": "object"}},
    },
    "TaskRunning": {
        "type": "object",
        "required": ["uuid", "status"],
        "properties": {"uuid": {"type": "string"}, "status": {"type": "string"}, "progress": NUMBER_OR_NULL,
                       "queue_position": {"type": "integer"}, "task_info": {"type": "object"}},
    },
    "UpstreamTask": {
        "type": "object",
        "description": "The upstream's own answer, passed through unchanged",
        "properties": {"success": {"type": "boolean"}, "data": {"type": "object"}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "service", "version", "timestamp"],
        "properties": {"status": {"const": "ok"}, "service": {"type": "string"}, "version": {"type": "string"},
                       "timestamp": {"type": "string"}, "pid": {"type": "integer"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "upstream", "waiters", "polling_loops"],
        "properties": {
            "status": {"enum": ["ready", "shutting_down", "store_unavailable", "upstream_auth_required"]},
            "store": {"type": "object", "properties": {"kind": {"enum": ["sqlite", "redis"]}, "ok": {"type": "boolean"},
                                                       "error": NULLABLE_STRING}},
            "upstream": {"type": "object", "required": ["url", "answered_recently"], "properties": {
                "url": {"type": "string"}, "answered_recently": {"type": "boolean"},
                "last_answer_seconds_ago": NUMBER_OR_NULL,
                "last_failure": {"type": ["object", "null"]},
                "auth_required_for_seconds": {"type": ["integer", "null"],
                                              "description": "Out after a browser check: seconds until it is "
                                                             "asked again"}}},
            "waiters": {"type": "integer"},
            "polling_loops": {"type": "integer"},
            "requests_in_flight": {"type": "integer"},
        },
    },
    "UsageList": {
        "type": "object", "required": ["object", "since", "until", "data"],
        "properties": {"object": {"const": "list"}, "since": {"type": "string"}, "until": {"type": "string"},
                       "data": {"type": "array", "items": {
                           "type": "object", "required": ["key", "day", "tasks", "images", "failed", "refused"],
                           "properties": {"key": {"type": "string"}, "day": {"type": "string"},
                                          "tasks": {"type": "integer"}, "images": {"type": "integer"},
                                          "failed": {"type": "integer"}, "refused": {"type": "integer"},
                                          "refused_by_reason": {"type": "object"}}}}},
    },
    "TaskPending": {
        "type": "object", "required": ["id", "object", "status"],
        "properties": {"id": {"type": "string"}, "object": {"const": "task"}, "status": {"type": "string"},
                       "progress": NUMBER_OR_NULL},
    },
    "TaskObjectList": {
        "type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {"object": {"const": "list"}, "first_id": NULLABLE_STRING, "last_id": NULLABLE_STRING,
                       "has_more": {"type": "boolean"}, "data": {"type": "array", "items": {
                           "type": "object", "required": ["id", "object", "status", "created_at"],
                           "properties": {"id": {"type": "string"}, "object": {"const": "task"},
                                          "status": {"type": "string"}, "created_at": {"type": "integer"}}}}},
    },
    "WebhookMessageList": {
        "type": "object", "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "has_more": {"type": "boolean"}, "data": {
            "type": "array", "items": {
            "type": "object", "required": ["id", "object", "type", "task_id", "url", "status", "attempts"],
            "properties": {"id": {"type": "string", "pattern": "^msg_"}, "object": {"const": "webhook.message"},
                           "type": {"type": "string"}, "task_id": {"type": "string"}, "url": {"type": "string"},
                           "key": {"type": "string", "description": "Admin listings only"},
                           "status": {"enum": ["pending", "delivered", "failed", "disabled"]},
                           "attempts": {"type": "integer"}, "last_status": {"type": ["integer", "null"]},
                           "last_error": NULLABLE_STRING, "next_attempt_at": NUMBER_OR_NULL,
                           "created_at": {"type": "number"}, "delivered_at": NUMBER_OR_NULL}}}},
    },
    "KeyList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["name", "admin", "tasks_today", "images_today", "last_seen"],
            "properties": {"name": {"type": "string"}, "admin": {"type": "boolean"},
                           "requests_per_minute": {"type": "integer"}, "images_per_day": {"type": "integer"},
                           "max_waiters": {"type": "integer"}, "tasks_today": {"type": "integer"},
                           "images_today": {"type": "integer"}, "refused_today": {"type": "integer"},
                           "last_seen": NUMBER_OR_NULL}}}},
    },
    "TaskList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "has_more": {"type": "boolean"},
                       "next_before": NUMBER_OR_NULL, "data": {"type": "array", "items": {
            "type": "object", "required": ["uuid", "key", "submitted_at", "status"],
            "properties": {"uuid": {"type": "string"}, "key": {"type": "string"}, "client": {"type": "string"},
                           "model": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                           "batch_size": {"type": "integer"}, "steps": {"type": "integer"},
                           "prompt": NULLABLE_STRING, "negative_prompt": NULLABLE_STRING,
                           "submitted_at": {"type": "number"}, "finished_at": NUMBER_OR_NULL,
                           "status": {"type": "string"}, "image_count": {"type": ["integer", "null"]},
                           "error": NULLABLE_STRING, "image_urls": {"type": "array", "items": {"type": "string"}}}}}},
    },
    "Info": {
        "type": "object",
        "required": ["service", "version", "endpoints"],
        "properties": {"service": {"type": "string"}, "version": {"type": "string"},
                       "demo": {"type": "boolean"}, "playground": {"type": "string"},
                       "endpoints": {"type": "array", "items": {"type": "object"}}},
    },
}

ADMIN_ERRORS = {"400": error("A malformed day, key or limit"),
                "401": error("No key, or not a known one", "WWW-Authenticate"),
                "403": error("The key is not an admin key")}
KEY_PARAM = {"name": "key", "in": "query", "required": False, "description": "One key's rows only (its name)",
             "schema": {"type": "string"}}


WEBHOOK_STATUS = {"name": "status", "in": "query", "required": False,
                  "schema": {"enum": ["pending", "delivered", "failed", "disabled"]}}
CSV_RESPONSE = {"description": "CSV, a header row first", "content": {"text/csv": {"schema": {"type": "string"}}}}


def LIMIT_PARAM(high: int) -> dict[str, Any]:  # noqa: N802 - reads like the constants
    return {"name": "limit", "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": high}}


def DAY_PARAM(name: str, description: str) -> dict[str, Any]:  # noqa: N802 - reads like the constants
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}


TASK_FILTERS = [KEY_PARAM, DAY_PARAM("since", "Submitted on or after this UTC day"),
                DAY_PARAM("until", "Submitted on or before this UTC day"),
                {"name": "status", "in": "query", "required": False,
                 "schema": {"enum": ["submitted", "completed", "failed", "expired"]}},
                {"name": "before", "in": "query", "required": False, "description": "The previous page's next_before",
                 "schema": {"type": "number"}},
                {"name": "end_user", "in": "query", "required": False, "description": "OpenAI's user of the submit",
                 "schema": {"type": "string"}}]


HEADERS = {
    "Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
    "x-should-retry": {"description": "false once the upstream has accepted the task: a retry would pay twice",
                       "schema": {"type": "string"}},
}


def document(endpoints: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """The document for `endpoints`, (method, path template, description) each."""
    paths = operations()
    for method, template, description in endpoints:
        paths[template][method.lower()]["summary"] = description
    return {
        "openapi": "3.1.0",
        "info": {"title": SERVICE_NAME, "version": __version__,
                 "description": "OpenAI-compatible gateway for the Z-Image text-to-image service"},
        "servers": [{"url": "/"}],
        "components": {
            "schemas": SCHEMAS,
            "headers": HEADERS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Only checked when api_keys are set"}},
        },
        "paths": paths,
        "webhooks": callbacks(),
    }


def callbacks() -> dict[str, Any]:
    """OpenAPI 3.1's `webhooks`: what a receiver of each event gets (a POST signed per Standard
    Webhooks) and what its answer means to the gateway."""
    signed = [{"name": name, "in": "header", "required": True, "schema": {"type": "string"}, "description": text}
              for name, text in (("webhook-id", "The message's id: the same on every retry of it"),
                                 ("webhook-timestamp", "Unix seconds of this attempt"),
                                 ("webhook-signature", "v1,<base64 HMAC-SHA256 of {id}.{timestamp}.{body}>, one per "
                                                       "secret, space-separated"))]
    return {event: {"post": {
        "summary": "Sent when a task %s" % CALLBACK_WHEN[event],
        "parameters": signed,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["type", "timestamp", "data"],
            "properties": {"type": {"const": event}, "timestamp": {"type": "string", "format": "date-time"},
                           "data": {"type": "object", "description": "The task as GET /v1/tasks/{uuid} shows it"}},
        }}}},
        "responses": {"2XX": {"description": "Delivered"},
                      "410": {"description": "The URL is disabled for the key: its messages are no longer sent"},
                      "default": {"description": "A 408, 429 or 5xx is retried (a 429's Retry-After honoured); "
                                                 "any other 4xx gives the message up"}},
    }} for event in EVENTS}


CALLBACK_WHEN = {"task.completed": "completes, with its image URLs", "task.failed": "fails",
                 "task.expired": "is no longer followed (follow_budget ran out)",
                 "task.progress": "changes status or progress (at most once a poll interval)"}


def operations() -> dict[str, Any]:
    """Every path's operations, without their summaries."""
    v1_errors = dict(COMMON_ERRORS)
    submit_errors = {"400": error("Invalid input; param names it; nothing reached the upstream"),
                     "413": error("The body is larger than max_body_bytes"),
                     **v1_errors, **UPSTREAM_ERRORS}
    return {
        "/v1/chat/completions": {"post": {
            "security": [{"bearer": []}, {}],
            "parameters": [IDEMPOTENCY_KEY, PREFER],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref("ChatCompletionRequest")}}},
            "responses": {
                "200": {"description": "The chat completion, or with stream=true Server-Sent Events of "
                                       "chat.completion.chunk objects ending with data: [DONE]",
                        "content": {"application/json": {"schema": ref("ChatCompletion")},
                                    "text/event-stream": {"schema": {
                                        "type": "string",
                                        "description": "chat.completion.chunk events; in wait mode progress in "
                                                       "delta.reasoning_content (chat_progress), the pictures in "
                                                       "delta.content; an image tool call as delta.tool_calls "
                                                       "with finish_reason tool_calls"}}}},
                **PREFERRED_WAIT_RAN_OUT, **submit_errors, **ACCEPTED_ERRORS},
        }},
        "/v1/completions": {"post": {
        "security": [{"bearer": []}, {}],
        "parameters": [IDEMPOTENCY_KEY, PREFER],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref("CompletionRequest")}}},
        "responses": {
            "200": {"description": "The text completion, or with stream=true Server-Sent Events of "
                                   "text_completion objects ending with data: [DONE]",
                    "content": {"application/json": {"schema": ref("TextCompletion")},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **PREFERRED_WAIT_RAN_OUT, **submit_errors, **ACCEPTED_ERRORS},
    }},
    "/v1/images/generations": {"post": {
            "security": [{"bearer": []}, {}],
            "parameters": [IDEMPOTENCY_KEY, PREFER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref("ImagesRequest")}}},
            "responses": {"200": {
                "description": "The pictures, or with stream=true Server-Sent Events: a comment after every status "
                               "read, then one image_generation.completed per picture",
                "content": {"application/json": {"schema": ref("ImagesResponse")},
                            "text/event-stream": {"schema": {"type": "string"}}}},
                          **PREFERRED_WAIT_RAN_OUT, **submit_errors, **ACCEPTED_ERRORS},
        }},
        "/v1/models": {"get": {"security": [{"bearer": []}, {}],
            "responses": {"200": json_response("The list", ref("ModelList")), **v1_errors}}},
        "/v1/models/{model}": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": json_response("The model", ref("Model")),
                          "404": error("Unknown model"), **v1_errors}}},
        "/v1/tasks": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                           {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "The last id of the previous page"},
                           {"name": "status", "in": "query", "required": False,
                            "schema": {"enum": ["submitted", "completed", "failed", "expired"]}},
                           {"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "Admin keys: another key's tasks"}],
            "responses": {"200": json_response("Your tasks, newest first", ref("TaskObjectList")),
                          "400": error("A malformed filter or cursor"), **v1_errors}}},
        "/v1/tasks/{uuid}/events": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [TASK_UUID],
            "responses": {"200": {"description": "text/event-stream: event: progress, then completed, failed, "
                                                 "expired or error",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          "400": error("Malformed uuid"), "404": error("Unknown task"), **v1_errors}}},
        "/v1/tasks/{uuid}": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [TASK_UUID],
            "responses": {"200": json_response("The upstream's answer", ref("UpstreamTask")),
                          "400": error("Malformed uuid"), "404": error("Unknown task"),
                          **v1_errors, **UPSTREAM_ERRORS}}},
        "/v1/webhooks": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [WEBHOOK_STATUS, LIMIT_PARAM(1000)],
            "responses": {"200": json_response("Your webhook messages, newest first", ref("WebhookMessageList")),
                          "400": error("A malformed status or limit"), **v1_errors}}},
        "/v1/images/{uuid}": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [
                TASK_UUID,
                {"name": "timeout", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0},
                 "description": "Wait at most this many seconds (capped by the server's budget)"},
                {"name": "wait", "in": "query", "required": False, "schema": {"type": "boolean"},
                 "description": "false: answer at once"},
            ],
            "responses": {
                "200": json_response("Completed", ref("ImagesReady")),
                "202": json_response("Still running (wait=false), or the server is shutting down",
                                     ref("TaskRunning"), ("Retry-After",)),
                "400": error("Malformed uuid or query"),
                "404": error("Unknown task"),
                "502": error("The task failed, or the wait ended while the upstream was failing"),
                "503": error("Too many waiting clients", "Retry-After"),
                "504": error("Still running when the wait ended"),
                "401": COMMON_ERRORS["401"], "429": UPSTREAM_ERRORS["429"]}}},
        "/v1/images/generations/{uuid}": {"get": {"security": [{"bearer": []}, {}],
            "parameters": [
                TASK_UUID,
                {"name": "response_format", "in": "query", "required": False, "schema": {"enum": ["url", "b64_json"]}},
                {"name": "output_format", "in": "query", "required": False,
                 "schema": {"enum": ["png", "jpeg", "webp"]}},
                {"name": "output_compression", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "maximum": 100}}],
            "responses": {
                "200": json_response("The answer POST /v1/images/generations would have given", ref("ImagesResponse")),
                "202": json_response("Still running", ref("TaskPending"), ("Retry-After",)),
                "400": error("Malformed uuid or query"),
                "404": error("Unknown task"),
                "410": error("Its pictures are no longer kept (picture_expired)"),
                "502": error("The task failed, or its pictures could not be fetched"),
                **v1_errors}}},
        "/v1/images/{uuid}/{index}": {"get": {
        "security": [{"bearer": []}, {}],
        "parameters": [TASK_UUID, {"name": "index", "in": "path", "required": True,
                                   "schema": {"type": "integer", "minimum": 0}},
                       {"name": "format", "in": "query", "required": False, "schema": {"enum": ["png", "jpeg", "webp"]},
                        "description": "Converted by the gateway (png: as the image host has it)"},
                       {"name": "compression", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 100},
                        "description": "jpeg and webp: the encoder's quality"},
                       {"name": "expires", "in": "query", "required": False, "schema": {"type": "integer"},
                        "description": "A signed link's expiry (Unix seconds)"},
                       {"name": "signature", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "A signed link's signature: no Authorization needed"}],
        "responses": {
            "200": {"description": "The picture (ETag, Accept-Ranges; pictures=keep: from the picture store)",
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                                "image/webp": {"schema": {"type": "string", "format": "binary"}}}},
            "206": {"description": "One byte range of it (Range)"},
            "304": {"description": "Not modified (If-None-Match)"},
            "400": error("Malformed uuid or index"),
            "403": error("A forged, altered or expired signed link"),
            "404": error("Unknown task, not finished, or no such picture"),
            "410": error("The picture is no longer kept (picture_expired)"),
            "416": error("A range past the picture's end"),
            "503": error("The picture store cannot be read or written just now (picture_store_unavailable)",
                         "Retry-After"),
            "502": error("The picture could not be fetched, or is refused by the image-fetch rule"),
            **v1_errors}}},
    "/health": {"get": {"responses": {"200": json_response("Alive", ref("Health"))}}},
        "/health/ready": {"get": {"responses": {
            "200": json_response("Ready", ref("Readiness")),
            "503": json_response("Shutting down, the store cannot answer, or the upstream demands a browser check",
                                 ref("Readiness"))}}},
        "/metrics": {"get": {"responses": {
            "200": {"description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            "401": COMMON_ERRORS["401"]}}},
        "/openapi.json": {"get": {"responses": {
            "200": json_response("OpenAPI 3.1", {"type": "object"})}}},
        "/favicon.ico": {"get": {"responses": {
            "200": {"description": "The icon", "content": {"image/svg+xml": {"schema": {"type": "string"}}}}}}},
        "/playground": {"get": {"responses": {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/admin/usage": {"get": {
        "security": [{"bearer": []}],
        "parameters": [DAY_PARAM("since", "First UTC day (default: 29 days before until)"),
                       DAY_PARAM("until", "Last UTC day (default: today)"), KEY_PARAM],
        "responses": {"200": json_response("Usage per key and day", ref("UsageList")),
                      **ADMIN_ERRORS}}},
    "/admin/usage.csv": {"get": {
        "security": [{"bearer": []}],
        "parameters": [DAY_PARAM("since", "First UTC day (default: 29 days before until)"),
                       DAY_PARAM("until", "Last UTC day (default: today)"), KEY_PARAM],
        "responses": {"200": CSV_RESPONSE, **ADMIN_ERRORS}}},
    "/admin/tasks": {"get": {
        "security": [{"bearer": []}],
        "parameters": TASK_FILTERS + [LIMIT_PARAM(1000)],
        "responses": {"200": json_response("Recorded tasks, newest first; next_before pages on", ref("TaskList")),
                      **ADMIN_ERRORS}}},
    "/admin/tasks.csv": {"get": {
        "security": [{"bearer": []}],
        "parameters": TASK_FILTERS + [LIMIT_PARAM(10000)],
        "responses": {"200": CSV_RESPONSE, **ADMIN_ERRORS}}},
    "/admin/keys": {"get": {
        "security": [{"bearer": []}],
        "responses": {"200": json_response("Every key's limits, today's use and last submit", ref("KeyList")),
                      **ADMIN_ERRORS}}},
    "/admin/pictures": {"get": {
        "security": [{"bearer": []}],
        "responses": {"200": json_response("The picture store", {
            "type": "object", "required": ["object", "mode"],
            "properties": {"object": {"const": "picture_store"}, "mode": {"enum": ["keep", "link"]},
                           "store": {"type": "string"}, "bytes": {"type": "integer"},
                           "pictures": {"type": "integer"}, "budget_bytes": {"type": "integer"},
                           "ttl_seconds": {"type": "number"}, "oldest_kept_at": NUMBER_OR_NULL,
                           "stored": {"type": "integer"}, "evicted": {"type": "integer"},
                           "expired": {"type": "integer"}, "failed": {"type": "integer"}}}),
                      **ADMIN_ERRORS}}},
    "/admin/webhooks": {"get": {
        "security": [{"bearer": []}],
        "parameters": [KEY_PARAM, WEBHOOK_STATUS, LIMIT_PARAM(1000)],
        "responses": {"200": json_response("Webhook messages, newest first", ref("WebhookMessageList")),
                      **ADMIN_ERRORS}}},
    "/admin/webhooks/{id}/retry": {"post": {
        "security": [{"bearer": []}],
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"202": json_response("The message, pending and due now", {"type": "object"}),
                      "404": error("No such message"), **ADMIN_ERRORS}}},
    "/admin": {"get": {"responses": {
        "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    "/": {"get": {"responses": {
            "200": json_response("The service", ref("Info")),
            "302": {"description": "To /playground, for a browser"}}}},
    }
