"""Start etcdgw with module attributes overridden: the benchmark's variant switches.

    python3 bench/launch.py --set etcdgw.server:NATIVE_ACCEPT=0 -- start --endpoints=...

Each --set imports the module, checks the attribute exists (a typo must not silently
benchmark the default) and sets it to the value parsed as int, then true/false, else kept
as a string; then etcdgw.cli.main(argv) runs with everything after `--`. Production code
reads no environment variable for these switches: only the benchmark flips them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent


def parse_value(text: str) -> int | bool | str:
    """'0' -> 0, '-3' -> -3, 'true'/'false' (any case) -> bool, anything else -> the str."""
    try:
        return int(text)
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_assignment(text: str) -> tuple[str, str, int | bool | str]:
    """'pkg.module:NAME=value' -> ('pkg.module', 'NAME', parsed value)."""
    target, eq, value = text.partition("=")
    module, colon, attr = target.partition(":")
    if not eq or not colon or not module or not attr.isidentifier():
        raise ValueError(f"--set {text!r}: expected MODULE:ATTRIBUTE=VALUE")
    return module, attr, parse_value(value)


def apply(assignments: list[tuple[str, str, Any]]) -> None:
    for module_name, attr, value in assignments:
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            raise ValueError(f"--set: module {module_name} has no attribute {attr}")
        setattr(module, attr, value)


def main(argv: list[str] | None = None) -> int:
    # `python3 bench/launch.py` puts bench/ first on sys.path: its modules (report, run,
    # stats, ...) must not shadow anything etcdgw or its dependencies import.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        i = args.index("--")
        own, rest = args[:i], args[i + 1 :]
    else:
        own, rest = args, []
    p = argparse.ArgumentParser(prog="bench/launch.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE:ATTR=VALUE",
        help="set a module attribute before etcdgw starts (repeatable)",
    )
    ns = p.parse_args(own)
    try:
        apply([parse_assignment(a) for a in ns.set])
    except (ValueError, ImportError) as exc:
        print(f"bench/launch.py: {exc}", file=sys.stderr)
        return 2
    from etcdgw.cli import main as etcdgw_main

    return etcdgw_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
