"""goerrors.py: Go's error texts, and that every dialler of the gateway words a failed
connect the same way (the data path, the health checks and member syncs, SRV validation)."""

from __future__ import annotations

import asyncio
import errno
import socket

from _etcd import free_port
from etcdgw import goerrors
from etcdgw.config import Endpoint
from etcdgw.dial import dial_error
from etcdgw.httpclient import HttpError, request
from etcdgw.tls import check_tls, client_context


def test_strerror_is_gos_lower_case_errno_text() -> None:
    assert goerrors.strerror(errno.ECONNREFUSED) == "connection refused"
    assert goerrors.strerror(ConnectionRefusedError(errno.ECONNREFUSED, "x")) == (
        "connection refused"
    )
    assert goerrors.strerror(OSError(errno.EMFILE, "Too many open files")) == (
        "too many open files"
    )
    # A resolver's error has no errno of the kernel's: its own text, lower case.
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert goerrors.strerror(gai) == "name or service not known"
    assert goerrors.strerror(ValueError("bad")) == "bad"
    assert goerrors.strerror(ValueError()) == "ValueError"


def test_an_errno_less_reset_reads_as_the_errno_it_stands_for() -> None:
    """asyncio's transports raise ConnectionResetError("Connection lost") or bare, without
    an errno: the same member reset read `ConnectionResetError` one time in fifteen
    (hostile review of issue 19, D3); it reads as Go's errno text every time."""
    with_errno = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert goerrors.strerror(with_errno) == "connection reset by peer"
    assert goerrors.strerror(ConnectionResetError()) == "connection reset by peer"
    assert goerrors.strerror(ConnectionResetError("Connection lost")) == (
        "connection reset by peer"
    )
    assert goerrors.strerror(BrokenPipeError()) == "broken pipe"
    assert goerrors.strerror(ConnectionAbortedError()) == "software caused connection abort"


def test_dial_texts() -> None:
    assert goerrors.dial_failed("h:1", goerrors.IO_TIMEOUT) == "dial tcp h:1: i/o timeout"
    assert goerrors.connect_failed("[::1]:2379", errno.ECONNREFUSED) == (
        "dial tcp [::1]:2379: connect: connection refused"
    )


def test_every_dialler_words_a_refused_connect_alike() -> None:
    port = free_port()
    where = f"127.0.0.1:{port}"
    want = f"dial tcp {where}: connect: connection refused"
    ep = Endpoint("127.0.0.1", port)
    # The data path (dial.py): what `deactivated endpoint` logs.
    assert dial_error(ep, "127.0.0.1", errno.ECONNREFUSED) == want
    # The health checks and member syncs (httpclient.py).
    addrs = [(socket.AF_INET, ("127.0.0.1", 0))]

    async def ask() -> str:
        try:
            await request(ep, addrs, timeout=5, ssl_context=None)
        except HttpError as e:
            return str(e)
        return ""

    assert asyncio.run(ask()) == f"GET http://{where}/health: {want}"
    # SRV validation (tls.py): Go's `"<url>" failed to dial (<err>)`.
    secure = Endpoint("127.0.0.1", port, secure=True)
    got = check_tls(secure, client_context(""), lambda host: [host], timeout=5)
    assert got == f'"https://{where}" failed to dial ({want})'
