"""A userspace delay hop: two TUN devices, every packet copied from one to the other late.

This kernel has no netem, so latency is injected here: `python -m tests.multihost.delayhop
NAME_A NAME_B DELAY_MS [JITTER_MS]` creates TUN devices `NAME_A` and `NAME_B` in the current
network namespace, prints `ready`, and from then on writes each IP packet read from one device
to the other `DELAY_MS` (± a uniform `JITTER_MS`, never reordered) later, in both directions.
The lab moves one device into a host's namespace and routes through the other. The devices
vanish when this process ends. Uses only the standard library (it runs as root in a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET_BYTES = 65536


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Hop:
    """One direction: packets read from `source` are written to `sink` after the delay."""

    def __init__(self, source: int, sink: int, delay_s: float, jitter_s: float) -> None:
        self.source, self.sink = source, sink
        self.delay_s, self.jitter_s = delay_s, jitter_s
        self.last_release = 0.0
        self.rng = random.Random()
        self.loop = asyncio.get_running_loop()

    def readable(self) -> None:
        while True:
            try:
                packet = os.read(self.source, MAX_PACKET_BYTES)
            except BlockingIOError:
                return
            jitter = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
            release = max(self.loop.time() + self.delay_s + jitter, self.last_release)
            self.last_release = release
            self.loop.call_at(release, self.write, packet)

    def write(self, packet: bytes) -> None:
        # Queue full or device gone: a lost packet, as on a real link.
        with contextlib.suppress(OSError):
            os.write(self.sink, packet)


async def main(name_a: str, name_b: str, delay_ms: float, jitter_ms: float) -> None:
    fd_a, fd_b = open_tun(name_a), open_tun(name_b)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    forward = Hop(fd_a, fd_b, delay_ms / 1000, jitter_ms / 1000)
    backward = Hop(fd_b, fd_a, delay_ms / 1000, jitter_ms / 1000)
    loop.add_reader(fd_a, forward.readable)
    loop.add_reader(fd_b, backward.readable)
    print("ready", flush=True)
    await stop.wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0], args[1], float(args[2]), float(args[3]) if len(args) > 3 else 0.0))
