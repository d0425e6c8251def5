"""Records what Open WebUI sends to its chat model and image engine, for tests/test_open_webui.py
to replay. A reverse proxy on 127.0.0.1 in front of a gateway: every request's method, path and
JSON body (never its Authorization) goes to a JSON-lines file, then on to the gateway.

    python tests/recordings/record_open_webui.py --listen 18080 --gateway http://127.0.0.1:18081 \\
        --out tests/recordings/open_webui-0.12.4.jsonl

Point Open WebUI's OPENAI_API_BASE_URL and IMAGES_OPENAI_API_BASE_URL at http://127.0.0.1:18080/v1,
then use it (docs/testing.md: "Re-recording Open WebUI" has the whole sequence).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from tornado.httpclient import AsyncHTTPClient
from tornado.web import Application, RequestHandler

DROPPED = {"authorization", "host", "content-length", "connection", "accept-encoding", "transfer-encoding"}


class Recorder(RequestHandler):
    def initialize(self, gateway: str, out: str) -> None:
        self.gateway, self.out = gateway, out

    async def forward(self) -> None:
        body = self.request.body or None
        try:
            recorded = json.loads(body) if body else None
        except ValueError:
            recorded = body.decode("utf-8", "replace") if body else None
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"method": self.request.method, "path": self.request.path, "body": recorded}) + "\n")
        headers = {k: v for k, v in self.request.headers.get_all() if k.lower() not in DROPPED}
        headers["Authorization"] = self.request.headers.get("Authorization", "")
        response = await AsyncHTTPClient().fetch(self.gateway + self.request.uri, method=self.request.method,
                                                 body=body, headers=headers, raise_error=False,
                                                 request_timeout=600, allow_nonstandard_methods=True)
        self.set_status(response.code)
        for name, value in response.headers.get_all():
            if name.lower() not in DROPPED:
                self.set_header(name, value)
        self.finish(response.body or b"")

    get = post = forward


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, default=18080)
    parser.add_argument("--gateway", default="http://127.0.0.1:18081")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Application([(r"/.*", Recorder, {"gateway": args.gateway, "out": args.out})]).listen(args.listen, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
