"""listeners.py: listening sockets and the socket files they own, end to end."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from _gateway import GatewayProc, TagServer, read_line

Start = Callable[..., GatewayProc]


def test_unix_socket_file_replaced_by_another_instance_is_left_alone(
    gateway: Start, tmp_path: Path
) -> None:
    """On exit the gateway unlinks its socket file only while it is still its own: if another
    instance replaced it meanwhile, that instance stays reachable."""
    path = tmp_path / "etcd.sock"
    with TagServer("a") as a:
        g = gateway(f"--endpoints={a.addr}", f"--listen-addr=unix://{path}")
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(str(path))
            assert read_line(c) == b"a\n"
        # Another instance takes the path over (as a restart with a new socket would).
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        other.listen(1)
        try:
            assert g.stop() == 0
            assert path.exists(), "the gateway removed a socket file it no longer owned"
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(path))  # the other instance is still reachable
        finally:
            other.close()


def test_unix_socket_file_removed_on_exit(gateway: Start, tmp_path: Path) -> None:
    path = tmp_path / "etcd.sock"
    with TagServer("a") as a:
        g = gateway(f"--endpoints={a.addr}", f"--listen-addr=unix://{path}")
        assert path.exists()
        assert g.stop() == 0
        assert not path.exists()
