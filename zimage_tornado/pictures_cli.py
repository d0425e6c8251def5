"""`zimage-tornado pictures`: the picture store from a terminal (no server needed; one may be
running: writes and removals take the store's lock)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from zimage_tornado.config import server_settings
from zimage_tornado.pictures import Shelf, open_backend


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="zimage-tornado pictures", description="The kept pictures.")
    parser.add_argument("command", choices=("gc", "stats"),
                        help="gc: remove pictures past pictures_ttl, then the oldest past pictures_max_bytes; "
                             "stats: what is kept")
    parser.add_argument("--config", help="the server's --config file, to find its pictures_dir and limits")
    parser.add_argument("--env-file", help="the server's environment file (systemd EnvironmentFile), likewise")
    parser.add_argument("--dir", help="the picture directory (default: the server's pictures_dir, or its bucket "
                                      "with pictures_s3_url)")
    args = parser.parse_args(argv)
    try:
        settings = server_settings(args.config, args.env_file)
    except (OSError, ValueError) as e:
        print("zimage-tornado pictures: %s" % e, file=sys.stderr)
        return 2
    if args.dir:
        settings = dataclasses.replace(settings, pictures_dir=args.dir, pictures_s3_url="")
    elif settings.pictures_path is None and not settings.pictures_s3_url:
        print("zimage-tornado pictures: database is :memory:, so pictures are kept in a temporary directory; "
              "give --dir", file=sys.stderr)
        return 2
    try:
        backend = open_backend(settings)
        shelf = Shelf(backend, settings.pictures_max_bytes, settings.pictures_ttl)
        usage = shelf.gc() if args.command == "gc" else shelf.usage()
    except (OSError, ValueError) as e:
        print("zimage-tornado pictures: %s" % e, file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - an S3 client's error: said in one line, not a traceback
        print("zimage-tornado pictures: the bucket failed: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps({"store": backend.describe(), **usage}))
    return 0
