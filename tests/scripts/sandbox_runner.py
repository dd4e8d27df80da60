"""Runs python_tool for the hostile-corpus tests as whatever user starts it (an unprivileged one).

Protocol, one JSON object per line: reads ``{"code": ..., "kwargs": {...}}`` from stdin, runs
``python_tool(code, **kwargs)`` and writes ``{"output": ...}`` (or ``{"raised": "Type: msg"}``)
to stdout; an empty line or EOF ends it. The first line written is ``{"ready": uid}``.
"""

import json
import os
import sys

from rlprim.tools import python_tool


def main() -> None:
    print(json.dumps({"ready": os.getuid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        try:
            reply = {"output": python_tool(request["code"], **request["kwargs"])}
        except Exception as exc:  # reported to the test, which fails with it
            reply = {"raised": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
