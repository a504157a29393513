"""pytest set-up for the kernel relay prototype: its module and the suite's shared helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1] / "tests"
sys.path[:0] = [str(HERE), str(TESTS)]  # sockmap; test_relay's helpers

_spec = importlib.util.spec_from_file_location("etcdgw_suite_conftest", TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
no_fd_leak = _suite.no_fd_leak
