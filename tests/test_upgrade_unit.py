"""The live upgrade's wire protocol and peer check (upgrade.py), on real unix socketpairs."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from etcdgw import upgrade
from etcdgw.upgrade import ProtocolError, check_peer, expect, recv_msg, send_msg


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(2)
    b.settimeout(2)
    return a, b


def test_peer_check_uses_so_peercred() -> None:
    a, b = pair()
    with a, b:
        assert check_peer(a) == os.getpid()
        assert check_peer(a, os.geteuid()) == os.getpid()
        with pytest.raises(ProtocolError, match=f"runs as uid {os.geteuid()}, not"):
            check_peer(a, os.geteuid() + 1)


def test_socketpair_peercred_names_its_creator_at_both_ends() -> None:
    """Why the old side checks no SO_PEERCRED: on a socketpair both ends report the process
    that created it, whoever holds the other end (here a child); the successor reads it to
    learn the old one's pid."""
    import subprocess
    import sys

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = (
        "import socket, struct, sys; s = socket.socket(fileno=int(sys.argv[1]));"
        "print(struct.unpack('3i', s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])"
    )
    with a, b:
        out = subprocess.run(
            [sys.executable, "-c", code, str(b.fileno())],
            pass_fds=(b.fileno(),),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert int(out.stdout) == os.getpid()  # the child's end: the creator, the old one
        assert upgrade.peer_cred(a)[0] == os.getpid()  # ours: ourselves, not the child


def test_deeply_nested_json_is_a_protocol_error() -> None:
    a, b = pair()
    with a, b:
        body = b"[" * 100_000
        a.sendall(struct.pack("!I", len(body)) + body)
        with pytest.raises(ProtocolError, match="nested too deeply"):
            recv_msg(b)


def test_message_with_descriptors_round_trip() -> None:
    a, b = pair()
    r, w = os.pipe()
    with a, b:
        send_msg(a, {"type": "X", "n": 1}, [r, w])
        msg, fds = recv_msg(b)
        assert msg == {"type": "X", "n": 1}
        assert len(fds) == 2 and not set(fds) & {r, w}
        assert not os.get_inheritable(fds[0])  # close-on-exec
        os.write(fds[1], b"z")
        assert os.read(r, 1) == b"z"
        for fd in (r, w, *fds):
            os.close(fd)


def test_at_most_253_descriptors_a_message() -> None:
    a, b = pair()
    with a, b, pytest.raises(ValueError):
        send_msg(a, {"type": "X"}, [0] * (upgrade.MAX_FDS + 1))


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "channel closed"),
        (struct.pack("!I", 5) + b"nope!", "not JSON"),
        (struct.pack("!I", 2) + b"[]", "no type"),
        (struct.pack("!I", 1 << 30), "at most"),
        (struct.pack("!I", 10) + b"{}", "truncated"),
    ],
)
def test_garbage_is_one_protocol_error_and_no_fd_leaks(raw: bytes, why: str) -> None:
    before = len(os.listdir("/proc/self/fd"))
    a, b = pair()
    r, w = os.pipe()
    with a, b:
        if raw:
            a.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", r, w))])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match=why):
            recv_msg(b)
    os.close(r)
    os.close(w)
    assert len(os.listdir("/proc/self/fd")) == before  # what was received was closed


def test_wrong_message_type_and_refusal() -> None:
    a, b = pair()
    with a, b:
        send_msg(a, {"type": "ERROR", "error": "protocol version 2 not supported"})
        with pytest.raises(ProtocolError, match="peer refused: protocol version 2"):
            expect(b, "LISTENERS")
        send_msg(a, {"type": "PAIRS"})
        with pytest.raises(ProtocolError, match="expected LISTENERS, got PAIRS"):
            expect(b, "LISTENERS")


def test_version_check() -> None:
    upgrade.check_version({"version": upgrade.VERSION})
    with pytest.raises(ProtocolError, match="protocol version 2 not supported"):
        upgrade.check_version({"version": 2})


def test_deadline_is_a_protocol_error() -> None:
    a, b = pair()
    b.settimeout(0.05)
    with a, b, pytest.raises(ProtocolError, match="deadline passed"):
        recv_msg(b)


@pytest.mark.parametrize(
    "raw",
    [{}, "x", [["a", 1]], [["a", 1, "2"]], [[1, 1, 2]], [["a", True, 2]], [["a"] * 3]],
)
def test_malformed_listener_files_are_a_protocol_error(raw: object) -> None:
    """LISTENERS' `files` (second review, D5): [[path, st_dev, st_ino], ...] or refused."""
    with pytest.raises(ProtocolError, match="malformed listener files"):
        upgrade._files(raw)


def test_listener_files_by_path() -> None:
    assert upgrade._files([["/run/a.sock", 5, 7], ["/run/b.sock", 5, 9]]) == {
        "/run/a.sock": (5, 7),
        "/run/b.sock": (5, 9),
    }
    assert upgrade._files([]) == {}
