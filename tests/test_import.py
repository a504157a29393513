"""The facade's choice of engine: compiled by default, pure Python on request or as fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import etcdgw
from etcdgw import relay

SRC = str(Path(etcdgw.__file__).resolve().parent.parent)

# A meta-path finder that makes `etcdgw._relay` fail to import in a chosen way.
BREAK = """
import sys
class Breaker:
    def find_spec(self, name, path=None, target=None):
        if name == "etcdgw._relay":
            raise {exc}("simulated: etcdgw._relay")
sys.meta_path.insert(0, Breaker())
"""
SHOW = "import etcdgw.relay as r; print(r.IMPLEMENTATION, r.Engine.__module__)"


def choose(env_value: str | None, prelude: str = "") -> str:
    """Import the facade in a fresh interpreter; return 'IMPLEMENTATION module'."""
    env = dict(os.environ)
    env.pop("ETCDGW_NO_EXTENSIONS", None)
    if env_value is not None:
        env["ETCDGW_NO_EXTENSIONS"] = env_value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", prelude + SHOW],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("value", ["1", "0", "yes"])
def test_any_non_empty_value_selects_pure_python(value: str) -> None:
    assert choose(value) == "python etcdgw._relay_py"


@pytest.mark.c_extension
def test_compiled_engine_is_loaded() -> None:
    # The guard against shipping or testing without the extension: FAILS (never skips)
    # when the .so is missing; --no-c-extensions (or ETCDGW_NO_EXTENSIONS) deselects it.
    assert relay.IMPLEMENTATION == "cython", "etcdgw._relay is not built"
    assert relay.Engine.__module__ == "etcdgw._relay"
    assert choose(None) == "cython etcdgw._relay"
    assert choose("") == "cython etcdgw._relay"  # empty means unset


def test_missing_extension_falls_back_to_pure_python() -> None:
    assert choose(None, BREAK.format(exc="ModuleNotFoundError")) == "python etcdgw._relay_py"


def test_broken_extension_fails_loudly() -> None:
    with pytest.raises(AssertionError, match="ImportError: simulated"):
        choose(None, BREAK.format(exc="ImportError"))


def test_facade_exports() -> None:
    assert set(relay.__all__) >= {"Engine", "IMPLEMENTATION", "Relay"}
    assert relay.IMPLEMENTATION in {"cython", "python"}
    expected = "python" if relay.NO_EXTENSIONS else relay.IMPLEMENTATION
    assert relay.IMPLEMENTATION == expected
