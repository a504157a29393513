"""monitor.py: what a dial's outcome means for an endpoint, per --health-check, end to end.

The default (tcp) and etcd modes are covered by test_server.py (deactivated endpoint,
--retry-delay re-probe) and test_health.py; here is --health-check=none, which probes
nothing and never takes an endpoint out of rotation (HAProxy's server without `check`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from _gateway import GatewayProc, TagServer, free_tcp_port, tag_via

Start = Callable[..., GatewayProc]


def test_health_check_none_keeps_every_endpoint_in_rotation(gateway: Start) -> None:
    dead = free_tcp_port()
    port = free_tcp_port()
    with TagServer("a") as a, TagServer("b") as b:
        g = gateway(
            f"--endpoints={a.addr},127.0.0.1:{dead},{b.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--health-check=none",
            "--retry-delay=1s",
        )
        # The dead member's clients are failed over to the next endpoint, one by one.
        got = [tag_via(port) for _ in range(9)]
        assert set(got) == {"a", "b"}, got
        time.sleep(2.5)  # two --retry-delay rounds: nothing may probe under `none`
        got += [tag_via(port) for _ in range(3)]
        assert set(got) == {"a", "b"}
        msgs = g.messages()
        assert "deactivated endpoint" not in msgs
        assert not any(m.startswith("failed to activate endpoint") for m in msgs)
        warned = g.wait_log("failed to connect to endpoint; trying the next (--health-check=none)")
        assert warned["address"] == f"127.0.0.1:{dead}"
        # The member comes back: it gets its share at once, without waiting for a probe.
        with TagServer("d", port=dead):
            again = [tag_via(port) for _ in range(6)]
            assert again.count("d") == 2, again
            assert "activated" not in g.messages()
        assert g.stop() == 0


def test_health_check_tcp_takes_a_dead_endpoint_out(gateway: Start) -> None:
    """The contrast: under the default, the same dead member is deactivated once and then
    skipped, and re-probed every --retry-delay."""
    dead = free_tcp_port()
    port = free_tcp_port()
    with TagServer("a") as a, TagServer("b") as b:
        g = gateway(
            f"--endpoints={a.addr},127.0.0.1:{dead},{b.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--retry-delay=1s",
        )
        got = [tag_via(port) for _ in range(9)]
        assert set(got) == {"a", "b"}
        assert g.wait_log("deactivated endpoint")["address"] == f"127.0.0.1:{dead}"
        g.wait_log("failed to activate endpoint (stay inactive for another interval)")
        assert g.messages().count("deactivated endpoint") == 1
        assert g.stop() == 0
