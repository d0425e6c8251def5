"""Result images fetched by the gateway itself, for `response_format: b64_json` answers."""

from __future__ import annotations

import asyncio
import base64

from zimage_tornado.domain import Task
from zimage_tornado.upstream import ZImageClient


class ImageFetcher:
    def __init__(self, upstream: ZImageClient, max_bytes: int) -> None:
        self.upstream = upstream
        self.max_bytes = max_bytes

    async def b64(self, task: Task) -> list[str]:
        """The task's images, fetched concurrently and base64-encoded, in order."""
        images = await asyncio.gather(*(self.upstream.fetch_image(url, self.max_bytes) for url in task.image_urls))
        return [base64.b64encode(image).decode("ascii") for image in images]
