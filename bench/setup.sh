#!/bin/sh
# Install the peer proxies and load tools the benchmark compares against (Debian apt), and
# matplotlib for `make bench-scale`'s plots (pip: the `bench` extra of pyproject.toml).
# Debian's postinst scripts auto-start nginx and haproxy as system services; the benchmark
# must own every process it measures and port 80 must stay free, so a service that this
# script's install started is stopped again (only via `service`, only if we started it).
set -eu

PKGS="haproxy nginx libnginx-mod-stream pen wrk iperf3 gcc"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
    echo "bench/setup.sh: pip-installing matplotlib (the bench extra)"
    "$PYTHON" -m pip install --quiet 'matplotlib>=3.5' || \
        echo "bench/setup.sh: warning: no matplotlib: make bench-scale will skip its plots"
fi

if [ -z "$missing" ]; then
    echo "bench/setup.sh: all of ($PKGS) already installed"
    exit 0
fi

# Which services were already running before the install: those are not ours to stop.
was_running() { service "$1" status >/dev/null 2>&1; }
nginx_before=0; haproxy_before=0
was_running nginx && nginx_before=1 || true
was_running haproxy && haproxy_before=1 || true

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
echo "bench/setup.sh: installing:$missing"
# iperf3's debconf question (start a daemon?) must not block or start a system server.
echo "iperf3 iperf3/start_daemon boolean false" | $SUDO debconf-set-selections || true
$SUDO apt-get update -o DPkg::Lock::Timeout=300 || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -o DPkg::Lock::Timeout=300 $missing

if [ "$nginx_before" -eq 0 ] && was_running nginx; then
    echo "bench/setup.sh: stopping the nginx service the install started"
    $SUDO service nginx stop || true
fi
if [ "$haproxy_before" -eq 0 ] && was_running haproxy; then
    echo "bench/setup.sh: stopping the haproxy service the install started"
    $SUDO service haproxy stop || true
fi
ss -ltnp 2>/dev/null | grep -E ':(80|443|5201)\s' && \
    echo "bench/setup.sh: warning: something still listens on 80/443/5201" || true
exit 0
