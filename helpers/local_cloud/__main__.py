"""``python -m helpers.local_cloud {start,status,stop}``: manage the local cloud by hand."""
from __future__ import annotations

import argparse
import sys

from helpers.local_cloud.control import ensure_running, find, serve, stop


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.local_cloud")
    parser.add_argument("command", choices=["start", "status", "stop", "serve"])
    parser.add_argument("--port", type=int, default=0, help="(serve) the port to listen on")
    args = parser.parse_args(argv)
    if args.command == "serve":  # the background process that start() launches
        serve(args.port)
    elif args.command == "start":
        state = ensure_running()
        print(state["endpoint"])
        for lost in state["lost_events"]:
            print(f"lost when the local cloud last stopped: an event for {lost['function']} "
                  f"received {lost['received']} ({lost['stage']}, {lost['attempts']} attempts)")
    elif args.command == "status":
        state = find()
        print(f"running at {state['endpoint']}" if state else "not running")
    else:
        print("stopped" if stop() else "was not running")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
