"""Refused packets on the node's UDP socket: the fast hint that a peer's process is gone.

QUIC runs over UDP, so a peer killed with `kill -9` closes no connection: without help its
death is seen only when it has been silent for `mesh.dead_after_s`. Its host still answers
every packet sent to the dead port with ICMP port unreachable. Linux reports that on an
unconnected UDP socket only with `IP_RECVERR` set, as an entry of the socket's error queue
(read with `MSG_ERRQUEUE`; the address returned is where the refused packet was sent). The
mesh core treats a refusal as a hint and probes (`MeshCore.peer_refused`).

`enable(sock)` turns the reports on; `drain(sock)` reads every queued entry and returns the
destinations that were refused. Other errors (host or network unreachable, too big) are read
and dropped: they say nothing certain about the peer's process. A pending error also makes the
next send on the socket fail once, so the error queue is drained as soon as it is reported.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

log = logging.getLogger(__name__)

# <linux/in.h>, not exported by the socket module.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_ANCILLARY_BYTES = 512
_MAX_ENTRIES = 256  # per drain: the queue is bounded by the socket's buffer, this by us


def enable(sock: socket.socket) -> bool:
    """Ask the kernel to report ICMP errors on `sock`; False where it cannot."""
    if sock.family != socket.AF_INET or not hasattr(socket, "MSG_ERRQUEUE"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    except OSError as exc:
        log.debug("IP_RECVERR not available (%s): refused packets go unnoticed", exc)
        return False
    return True


def drain(sock: socket.socket) -> list[tuple[str, int]]:
    """Read the error queue of `sock`; the destinations of the packets that were refused."""
    refused: list[tuple[str, int]] = []
    for _ in range(_MAX_ENTRIES):
        try:
            _, ancillary, _, address = sock.recvmsg(1, _ANCILLARY_BYTES, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.debug("reading the UDP error queue failed: %s", exc)
            break
        if _is_refusal(ancillary) and isinstance(address, tuple) and len(address) >= 2:
            refused.append((str(address[0]), int(address[1])))
    return refused


def _is_refusal(ancillary: list[tuple[int, int, bytes]]) -> bool:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_RECVERR and len(data) >= _EXTENDED_ERR.size:
            ee_errno: int = _EXTENDED_ERR.unpack_from(data)[0]
            return ee_errno == errno.ECONNREFUSED
    return False
