"""Shared fixtures: the relay engine under test, fd-leak checks, and the real-part fixtures."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

NO_EXTENSIONS = bool(os.environ.get("ETCDGW_NO_EXTENSIONS"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=NO_EXTENSIONS,
        help="deselect tests of the compiled relay engine",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `slow` scenarios (tests/test_reliability.py) are deselected, not skipped, unless asked
    # for with `-m slow` or ETCDGW_SLOW=1: a default run never counts them as passed.
    markexpr = config.getoption("markexpr", "") or ""
    if "slow" not in markexpr and not os.environ.get("ETCDGW_SLOW"):
        slow = [i for i in items if i.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [i for i in items if not i.get_closest_marker("slow")]
    if not config.getoption("--no-c-extensions"):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("c_extension") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extension), "python"],
    ids=["cython", "python"],
)
def relay_impl(request: pytest.FixtureRequest) -> str:
    """The engine name under test: every relay and server test runs once per engine."""
    return str(request.param)


@pytest.fixture(scope="session")
def engine_module(relay_impl: str) -> ModuleType:
    """The engine module itself (etcdgw._relay or etcdgw._relay_py)."""
    name = "etcdgw._relay" if relay_impl == "cython" else "etcdgw._relay_py"
    return importlib.import_module(name)


# The engine-level matrix: the Cython engine runs in two modes, loop-driven (run() relays)
# and threaded (a relay thread of its own relays; run() collects what finished), so every
# engine test (tests/test_relay.py, tests/test_handover_engine.py) runs on three.
@pytest.fixture(
    scope="session",
    params=[
        pytest.param("cython", marks=pytest.mark.c_extension),
        pytest.param("cython-thread", marks=pytest.mark.c_extension),
        "python",
    ],
)
def engine_kind(request: pytest.FixtureRequest) -> str:
    """The engine under test: cython (loop mode), cython-thread, or python."""
    return str(request.param)


@pytest.fixture(scope="session")
def threaded(engine_kind: str) -> bool:
    return engine_kind == "cython-thread"


@pytest.fixture(scope="session")
def engine_cls(engine_kind: str, threaded: bool) -> Callable[..., Any]:
    """Engine(bufsize) in the mode under test, as Relay(engine_cls=...) calls it."""
    module = importlib.import_module(
        "etcdgw._relay" if engine_kind.startswith("cython") else "etcdgw._relay_py"
    )
    return functools.partial(module.Engine, threaded=threaded)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves file descriptors open in this process."""
    import gc

    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    # /proc/self/fd listing itself may show a transient fd; re-check once.
    leaked &= open_fds()
    assert not leaked, f"leaked fds: {sorted(leaked)} -> " + ", ".join(
        _describe(fd) for fd in sorted(leaked)
    )


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# Real-part fixtures live in their own modules (tests/ is on sys.path under pytest's default
# "prepend" import mode): a 3-member etcd cluster, and a dnsmasq DNS server.
from _dns import *  # noqa: E402,F401,F403
from _etcd import *  # noqa: E402,F401,F403
from _gateway import *  # noqa: E402,F401,F403
from _parts import _fd_leak_check_in_process, make  # noqa: E402,F401  (the parts factory; the fd-leak check of its users)
