"""`make demo`'s script: a real 3-member cluster, etcdgw in front, etcdctl through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _etcd import free_port


def test_demo_script_runs() -> None:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEMO_SECONDS": "1",
        "DEMO_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
    }
    r = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready to proxy client requests" in r.stdout
    assert "\nfoo\nbar\n" in r.stdout
