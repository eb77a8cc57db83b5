"""The lab itself: hosts reach each other only as built, and injected faults have the size
asked for (delay within ±20 % by ping, loss share, partition, NAT one way only)."""

from __future__ import annotations

import socket

import pytest

from tests.multihost.netlab import Lab

pytestmark = pytest.mark.multihost


def test_hosts_on_the_switch_reach_each_other_and_nothing_else(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    assert a.rtt_ms(b, count=3) < 20
    assert "default" not in a.run("ip", "route")
    with pytest.raises(OSError):  # no route out of the lab
        a.call(lambda: socket.create_connection(("1.1.1.1", 80), timeout=2))


@pytest.mark.parametrize("rtt_ms", [20.0, 150.0])
def test_delay_hop_adds_the_asked_rtt_within_20_percent(lab: Lab, rtt_ms: float) -> None:
    a, slow = lab.add_host("a"), lab.add_delayed_host("slow", rtt_ms)
    measured = a.rtt_ms(slow, count=10)
    print(f"injected RTT {rtt_ms} ms, measured by UDP echo {measured:.1f} ms")
    assert rtt_ms * 0.8 <= measured <= rtt_ms * 1.2


def test_loss_rule_drops_about_the_asked_share(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.loss(a, 20)
    share = a.loss_share(b, count=400)
    print(f"20 % egress loss: {share:.1%} of pings lost")
    assert 0.12 <= share <= 0.28
    a.set_fault("loss", None, egress_only=True)
    assert a.loss_share(b, count=20) == 0.0


def test_partition_cuts_a_host_off_and_heal_restores_it(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.partition(a)
    assert a.loss_share(b, count=5) == 1.0
    assert a.loss_share(a, count=3) == 0.0  # its own address, over loopback
    lab.heal(a)
    assert a.loss_share(b, count=5) == 0.0


def test_nat_host_dials_out_but_cannot_be_dialed(lab: Lab) -> None:
    public, natted = lab.add_host("pub"), lab.add_nat_host("nat")
    with pytest.raises(OSError):  # the router lets nothing in that the inside did not open
        public.call(lambda: socket.create_connection((natted.public, 22), timeout=2))
    # TCP from inside shows the router's public address to the far side (masquerade).
    listener = public.call(lambda: socket.create_server(("0.0.0.0", 0)))
    with listener:
        port = listener.getsockname()[1]
        listener.settimeout(10)
        client = natted.call(lambda: socket.create_connection((public.addr, port), timeout=10))
        with client:
            conn, (peer_ip, _) = listener.accept()
            conn.close()
    assert peer_ip == natted.public != natted.addr
