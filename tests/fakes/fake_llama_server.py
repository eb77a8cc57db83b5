"""A fake `llama-server` executable for process-level benchmarks of the proxy path.

`python -m tests.fakes.fake_llama_server --port P [...llama-server flags...]` serves
`FakeLlama` on 127.0.0.1:P, healthy at once; streams `FAKE_LLAMA_CHUNKS` SSE chunks (default
1000) `FAKE_LLAMA_DELAY_S` apart (default 0: as fast as possible). Every other llama-server flag
is accepted and ignored; `--version` prints a llama.cpp-style version line. `write_wrapper(dir)`
creates an executable `llama-server` script in `dir` that runs this module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from pathlib import Path

from aiohttp import web

from tests.fakes.fake_llama import FakeLlama

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_wrapper(directory: Path) -> Path:
    """An executable `llama-server` in `directory` that starts this fake."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "llama-server"
    script.write_text(
        "#!/bin/sh\n"
        f'cd "{REPO_ROOT}" && exec "{sys.executable}" -m tests.fakes.fake_llama_server "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--version", action="store_true")
    args, _ignored = parser.parse_known_args()
    if args.version:
        print("version: 1 (fake)")
        return 0
    fake = FakeLlama(
        healthy=True,
        chunks=int(os.environ.get("FAKE_LLAMA_CHUNKS", "1000")),
        chunk_delay_s=float(os.environ.get("FAKE_LLAMA_DELAY_S", "0")),
    )
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
