"""ApiError: the one exception a handler raises to answer a client with an error.

Every error body is OpenAI's envelope, so SDKs raise their usual exceptions; `extra` adds
gateway fields beside it (a long-poll's `uuid` and `status`) without breaking that shape.
"""

from __future__ import annotations

from typing import Any, Mapping


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {**self.extra, "error": envelope(self.message, self.type, self.param, self.code)}


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type, "param": param, "code": code}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 for input the client can fix."""
    return ApiError(400, message, param=param, code=code)
