"""Write man/etcdgw.1 from etcdgw.cli.get_parser() with argparse-manpage (`make man`).

`--check` exits 1 when the committed page differs from what the parser gives now (the date
line aside). COLUMNS is pinned so the synopsis wraps the same on every terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "man" / "etcdgw.1"
EXTRA = ROOT / "man" / "sections.ini"
DESCRIPTION = "local TCP gateway for etcd clusters"


def render() -> str:
    env = {**os.environ, "COLUMNS": "80"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "etcdgw.1"
        subprocess.run(
            [
                "argparse-manpage",
                "--module", "etcdgw.cli",
                "--function", "get_parser",
                "--prog", "etcdgw",
                "--project-name", "etcdgw",
                # The NAME line `etcdgw \- ...` that lexgrog/mandb index for whatis and
                # apropos (`man -k etcd`); keep it one short line.
                "--description", DESCRIPTION,
                "--manual-title", "etcdgw manual",
                "--url", "https://pypi.org/project/etcdgw/",
                "--include", str(EXTRA),
                "--output", str(out),
            ],
            check=True,
            env=env,
        )  # fmt: skip
        return out.read_text()


def body(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not ln.startswith(".TH")]


def main() -> int:
    page = render()
    if sys.argv[1:] == ["--check"]:
        if not PAGE.exists() or body(PAGE.read_text()) != body(page):
            print("man/etcdgw.1 is out of date: run `make man`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
