"""A network lab of Linux network namespaces for the multi-host tier.

`Lab` builds hosts as network namespaces on one switch (a bridge inside its own namespace),
optionally behind a NAT router namespace (masquerade: the host can dial out, nobody can dial
in) or behind a userspace delay hop (`delayhop.py`: this kernel has no netem). Faults are
nftables rules inside a host's namespace (`block`, `partition`, `loss`) and TBF for bandwidth.
Nothing here routes out of the lab: the switch and routers have no default route and the root
namespace gets no address in it. Every namespace name starts with the lab's unique prefix
(`mlab<creator pid>x<n>-`), so `close()` (and `sweep_stale()`, for labs whose creator died)
remove only what a lab made: its processes (by pid, from `ip netns pids`), then namespaces,
which takes their links, bridges and nftables tables with them.

`Host.call(fn)` runs `fn` in a thread that entered the host's namespace (setns), so a test in
the root namespace reaches a node's 127.0.0.1-only API and console; `NetnsMeshProcess` is the
e2e harness's `MeshProcess` started with `ip netns exec` and probed that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from tests.e2e.harness import MeshProcess, wait_until

_T = TypeVar("_T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
HOP_READY_TIMEOUT_S = 20.0
_COUNTER = itertools.count()
_PREFIX_RE = re.compile(r"^mlab(\d+)x\d+-")


def skip_reason() -> str | None:
    """Why this machine cannot run the lab, or None."""
    if os.geteuid() != 0:
        return "the multi-host tier needs root (network namespaces, veth, nftables)"
    for tool in ("ip", "tc", "nft"):
        if not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin", "/usr/bin")):
            return f"the multi-host tier needs `{tool}` (apt-get install iproute2 nftables)"
    if not Path("/dev/net/tun").exists():
        return "the multi-host tier needs /dev/net/tun (the delay hop)"
    return None


def sh(*argv: str, input_text: str | None = None) -> str:
    """Run a command; raise with its stderr when it fails."""
    done = subprocess.run(argv, input=input_text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(name: str, fn: Callable[[], _T]) -> _T:
    """`fn()` in a fresh thread inside namespace `name` (sockets it opens live there)."""
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns(name)
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@dataclass
class Host:
    """One namespace: `addr` is its address on the switch (for NAT'd hosts: its LAN address;
    `public` is the address others see)."""

    lab: Lab
    name: str
    ns: str
    addr: str
    public: str
    device: str = "eth0"
    faults: dict[str, str] = field(default_factory=dict)
    egress: dict[str, str] = field(default_factory=dict)

    def run(self, *argv: str) -> str:
        return sh("ip", "netns", "exec", self.ns, *argv)

    def call(self, fn: Callable[[], _T]) -> _T:
        return call_in_netns(self.ns, fn)

    def nft(self, script: str) -> None:
        sh("ip", "netns", "exec", self.ns, "nft", "-f", "-", input_text=script)

    def set_fault(self, key: str, rules: str | None, *, egress_only: bool = False) -> None:
        """Set (or with None remove) one named fault, then rewrite this host's nftables table.
        A fault is rule text for an inet filter chain, applied to input and output (or only
        to output with `egress_only`)."""
        table = self.egress if egress_only else self.faults
        if rules is None:
            table.pop(key, None)
        else:
            table[key] = rules
        both, out = "\n".join(self.faults.values()), "\n".join(self.egress.values())
        self.nft(
            "table inet netlab\ndelete table inet netlab\n"
            "table inet netlab {\n"
            f"  chain faults {{\n{both}\n  }}\n"
            f"  chain egress {{\n{out}\n  }}\n"
            "  chain input { type filter hook input priority 0; policy accept; jump faults; }\n"
            "  chain output { type filter hook output priority 0; policy accept;\n"
            "    jump faults; jump egress; }\n"
            "}\n"
        )

    def add_bridge_address(self, device: str, cidr: str) -> None:
        """An empty bridge `device` holding `cidr`, as Docker's docker0 on a real machine
        (this kernel has no dummy interfaces)."""
        self.run("ip", "link", "add", device, "type", "bridge")
        self.run("ip", "addr", "add", cidr, "dev", device)
        self.run("ip", "link", "set", device, "up")

    def bandwidth(self, rate: str) -> None:
        """Cap this host's egress with TBF (`rate` as tc writes it: 10mbit)."""
        self.run(
            "tc", "qdisc", "replace", "dev", self.device, "root", "tbf",
            "rate", rate, "burst", "32kbit", "latency", "400ms",
        )  # fmt: skip

    def udp_probe(self, target: Host, count: int, interval_s: float = 0.01) -> list[float]:
        """Send `count` UDP echo probes from this host to `target`'s address as this host
        sees it; returns the RTT (ms) of each probe answered within a second (no ping binary
        needed: the sockets are opened inside the namespaces)."""
        server = target.call(lambda: _udp_socket("0.0.0.0"))
        client = self.call(lambda: _udp_socket("0.0.0.0"))
        port = server.getsockname()[1]
        stop = threading.Event()

        def echo() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    data, peer = server.recvfrom(64)
                    server.sendto(data, peer)

        echoer = threading.Thread(target=echo, daemon=True)
        echoer.start()
        sent: dict[int, float] = {}
        rtts: list[float] = []
        client.setblocking(False)
        try:
            deadline = time.monotonic() + count * interval_s + 1.0
            seq = 0
            while time.monotonic() < deadline:
                if seq < count:
                    sent[seq] = time.monotonic()
                    with contextlib.suppress(OSError):  # no route: a lost probe
                        client.sendto(seq.to_bytes(4, "big"), (target.public, port))
                    seq += 1
                ready, _, _ = select.select([client], [], [], interval_s)
                while ready:
                    try:
                        data = client.recv(64)
                    except (BlockingIOError, OSError):
                        break
                    rtts.append((time.monotonic() - sent[int.from_bytes(data, "big")]) * 1000)
                if seq >= count and len(rtts) == count:
                    break
        finally:
            stop.set()
            echoer.join()
            server.close()
            client.close()
        return rtts

    def rtt_ms(self, target: Host, count: int = 10) -> float:
        """Median UDP round trip to `target` (ms)."""
        rtts = self.udp_probe(target, count, interval_s=0.1)
        assert rtts, f"no probe from {self.name} to {target.name} came back"
        return statistics.median(rtts)

    def loss_share(self, target: Host, count: int) -> float:
        return 1 - len(self.udp_probe(target, count)) / count


def _udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


class Lab:
    """Namespaces, links and processes of one test; `close()` removes them all."""

    def __init__(self) -> None:
        self.prefix = f"mlab{os.getpid()}x{next(_COUNTER)}-"
        # 198.18.0.0/15 is reserved for network tests (RFC 2544): it clashes with no real
        # network, and as text it sorts after 172.17.x (scenario 2 relies on that).
        self.net = f"198.18.{(os.getpid() + next(_COUNTER)) % 200 + 20}"
        self.switch = self.prefix + "sw"
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        self.hops: list[subprocess.Popen[bytes]] = []
        self._host_index = itertools.count(1)
        try:
            self._new_ns(self.switch)
            self._sw("link", "add", "br0", "type", "bridge")
            self._sw("link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------------------

    def _new_ns(self, name: str) -> None:
        self.namespaces.append(name)
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _sw(self, *argv: str) -> None:
        sh("ip", "-n", self.switch, *argv)

    def _plug(self, ns: str, addr: str, port: str) -> None:
        """A veth from the switch's bridge to `eth0` in `ns`, with `addr`/24 on it."""
        self._sw("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._sw("link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def add_host(self, name: str) -> Host:
        """A host plugged straight into the switch."""
        index = next(self._host_index)
        ns, addr = self.prefix + name, f"{self.net}.{index}"
        self._new_ns(ns)
        self._plug(ns, addr, f"p{index}")
        host = Host(self, name, ns, addr, addr)
        self.hosts.append(host)
        return host

    def add_nat_host(self, name: str) -> Host:
        """A host on a private LAN behind a masquerading router on the switch. The host can
        open connections to the switch; nothing on the switch can open one to the host."""
        index = next(self._host_index)
        router, ns = self.prefix + name + "-r", self.prefix + name
        public, lan_router, lan_host = f"{self.net}.{index}", "192.168.7.1", "192.168.7.2"
        self._new_ns(router)
        self._new_ns(ns)
        self._plug(router, public, f"p{index}")
        sh("ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        sh("ip", "-n", router, "addr", "add", f"{lan_router}/24", "dev", "lan0")
        sh("ip", "-n", router, "link", "set", "lan0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{lan_host}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", lan_router)
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", router, "nft", "-f", "-", input_text=(
            "table ip nat {\n"
            "  chain postrouting { type nat hook postrouting priority 100;\n"
            "    oifname eth0 masquerade\n  }\n"
            "}\n"
            "table inet fw {\n"
            "  chain forward { type filter hook forward priority 0; policy drop;\n"
            "    ct state established,related accept\n"
            "    iifname lan0 oifname eth0 accept\n  }\n"
            "}\n"
        ))  # fmt: skip
        host = Host(self, name, ns, lan_host, public)
        self.hosts.append(host)
        return host

    def add_delayed_host(self, name: str, rtt_ms: float, jitter_ms: float = 0.0) -> Host:
        """A host whose every packet to and from the switch crosses a delay hop adding
        `rtt_ms`/2 each way. It keeps an address on the switch's subnet (its router answers
        ARP for it), so the others reach it as they reach any host."""
        index = next(self._host_index)
        router, ns = self.prefix + name + "-d", self.prefix + name
        addr, router_addr = f"{self.net}.{index}", f"{self.net}.{index + 100}"
        self._new_ns(router)
        self._new_ns(ns)
        self._plug(router, router_addr, f"p{index}")
        hop = subprocess.Popen(
            [
                *("ip", "netns", "exec", router, sys.executable, "-m"),
                *("tests.multihost.delayhop", "hopa", "hopb", str(rtt_ms / 2), str(jitter_ms / 2)),
            ],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.hops.append(hop)
        assert hop.stdout is not None
        line = _read_line(hop.stdout, HOP_READY_TIMEOUT_S)
        assert line == b"ready\n", f"delay hop did not start: {line!r}"
        sh("ip", "-n", router, "link", "set", "hopa", "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "hopa")
        sh("ip", "-n", ns, "link", "set", "hopa", "up")
        sh("ip", "-n", ns, "route", "add", f"{self.net}.0/24", "dev", "hopa")
        sh("ip", "-n", router, "link", "set", "hopb", "up")
        sh("ip", "-n", router, "route", "add", f"{addr}/32", "dev", "hopb")
        # proxy_delay 0: the kernel would otherwise hold proxy ARP answers up to 0.8 s.
        for key in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.eth0.proxy_arp=1",
            "net.ipv4.neigh.eth0.proxy_delay=0",
        ):
            sh("ip", "netns", "exec", router, "sysctl", "-qw", key)
        host = Host(self, name, ns, addr, addr, device="hopa")
        self.hosts.append(host)
        return host

    # -- faults --------------------------------------------------------------------------

    def block_tcp(self, a: Host, b: Host, key: str = "block-tcp") -> None:
        """Drop TCP between `a` and `b` (both ways), as a firewall between them would."""
        a.set_fault(key, f"ip daddr {b.public} meta l4proto tcp drop\n"
                         f"ip saddr {b.public} meta l4proto tcp drop")  # fmt: skip

    def unblock(self, a: Host, key: str = "block-tcp") -> None:
        a.set_fault(key, None)

    def partition(self, host: Host) -> None:
        """Cut `host` off from every other host (its loopback keeps working)."""
        host.set_fault("partition", 'iifname != "lo" oifname != "lo" drop')

    def heal(self, host: Host) -> None:
        host.set_fault("partition", None)

    def loss(self, host: Host, percent: int) -> None:
        """Drop `percent` % of the packets `host` sends to other hosts (at random)."""
        rule = f'oifname != "lo" numgen random mod 100 < {percent} counter drop'
        host.set_fault("loss", rule, egress_only=True)

    def link_down(self, host: Host) -> None:
        """Take `host`'s link down: its peers see silence, no FIN, no RST."""
        sh("ip", "-n", host.ns, "link", "set", host.device, "down")

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what runs in this lab's namespaces (by pid), then delete them."""
        for hop in self.hops:
            if hop.poll() is None:
                hop.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    hop.wait(timeout=5)
            if hop.poll() is None:
                hop.kill()
                hop.wait()
            if hop.stdout is not None:
                hop.stdout.close()
        for ns in reversed(self.namespaces):
            _kill_netns_pids(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()


def _read_line(stream: Any, timeout_s: float) -> bytes:
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0] if box else b""


def _kill_netns_pids(ns: str) -> None:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in (int(p) for p in done.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        if not done.stdout.split():
            return
        time.sleep(0.1)


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a crashed earlier run)."""
    removed = []
    for ns in sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []:
        match = _PREFIX_RE.match(ns)
        if match and not psutil.pid_exists(int(match.group(1))):
            _kill_netns_pids(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            removed.append(ns)
    return removed


@dataclass
class NetnsMeshProcess(MeshProcess):
    """A `mesh-llm` node inside a lab host; its API and console are probed from inside."""

    host: Host | None = None

    def __post_init__(self) -> None:
        assert self.host is not None
        self.command = ["ip", "netns", "exec", self.host.ns, *self.command]

    def status(self) -> dict[str, Any]:
        assert self.host is not None
        return self.host.call(super().status)

    def wait_ready(self, timeout_s: float = 180.0, *, local: bool | None = None) -> None:
        """Wait for a model this node serves itself (unless `local` is False: any model)."""
        own = "--client" not in self.args if local is None else local

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}):\n{self.log_text()}")
            return any(
                m["state"] == "ready" and (m["host"] == "local" or not own)
                for m in self.status().get("models", [])
            )

        try:
            wait_until(ready, timeout_s, f"a ready model on {self.home.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- node log ---\n{self.log_text()}") from None
