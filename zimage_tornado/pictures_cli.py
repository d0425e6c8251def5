"""`zimage-tornado pictures`: the picture store from a terminal (no server needed; one may be
running: writes and removals take the store's lock)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from zimage_tornado.config import server_settings
from zimage_tornado.pictures import Shelf


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="zimage-tornado pictures", description="The kept pictures.")
    parser.add_argument("command", choices=("gc", "stats"),
                        help="gc: remove pictures past pictures_ttl, then the oldest past pictures_max_bytes; "
                             "stats: what is kept")
    parser.add_argument("--config", help="the server's --config file, to find its pictures_dir and limits")
    parser.add_argument("--env-file", help="the server's environment file (systemd EnvironmentFile), likewise")
    parser.add_argument("--dir", help="the picture directory (default: the server's)")
    args = parser.parse_args(argv)
    try:
        settings = server_settings(args.config, args.env_file)
    except (OSError, ValueError) as e:
        print("zimage-tornado pictures: %s" % e, file=sys.stderr)
        return 2
    path = args.dir or settings.pictures_path
    if path is None:
        print("zimage-tornado pictures: database is :memory:, so pictures are kept in a temporary directory; "
              "give --dir", file=sys.stderr)
        return 2
    try:
        shelf = Shelf(path, settings.pictures_max_bytes, settings.pictures_ttl)
        usage = shelf.gc() if args.command == "gc" else shelf.usage()
    except OSError as e:
        print("zimage-tornado pictures: %s: %s" % (path, e.strerror or e), file=sys.stderr)
        return 1
    print(json.dumps({"dir": path, **usage}))
    return 0
