"""The least a Tornado gateway can spend on a submit: parse the JSON body, forward one POST to
the upstream on the gateway's own kept-alive client, answer a small JSON. No keys, limits,
store, metrics or logs. `bench/submit.py --keys all` runs it under the same load as the gateway,
to show how much of a submit's CPU is the framework's and how much the gateway's.

    python bench/floor_proxy.py PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tornado.web  # noqa: E402

from submit import UPSTREAM_BODY  # noqa: E402  (the body the benchmark sends the upstream directly)
from zimage_tornado import eventloop  # noqa: E402
from zimage_tornado.pooled_http import PooledHTTPClient  # noqa: E402


class Forward(tornado.web.RequestHandler):
    async def post(self) -> None:
        request = json.loads(self.request.body)
        body = dict(UPSTREAM_BODY, prompt=request["messages"][-1]["content"])
        answer = await self.application.settings["http"].fetch(
            self.application.settings["upstream"], method="POST", body=json.dumps(body),
            headers={"Content-Type": "application/json"})
        uuid = json.loads(answer.body)["data"]["uuid"]
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"id": uuid, "object": "chat.completion",
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": uuid}}]}))


async def serve(port: int, upstream_port: int) -> None:
    http = PooledHTTPClient(force_instance=True, max_clients=200)
    app = tornado.web.Application([(r"/v1/chat/completions", Forward)], http=http,
                                  upstream="http://127.0.0.1:%d/api/z-image/generate" % upstream_port)
    app.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    eventloop.run(serve(int(sys.argv[1]), int(sys.argv[2])), "auto")
