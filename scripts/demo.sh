#!/usr/bin/env bash
# `make demo`: a local 3-member etcd cluster with etcdgw in front of it on 127.0.0.1:23790,
# a put/get through it, then wait for Ctrl-C. The work is in demo.py (it shares the etcd
# harness with the tests); it stops everything it started and removes its temp dir on exit.
#   GATEWAY_CMD="etcd gateway" scripts/demo.sh     # the same demo with the Go gateway
#   DEMO_SECONDS=5 scripts/demo.sh                 # exit by itself after 5 s
set -euo pipefail
exec "${PYTHON:-python3}" -u "$(dirname "$0")/demo.py" "$@"
