#!/usr/bin/env bash
# Installs what the local stack and the tests need, idempotently:
# Debian packages (HAProxy, CRS) and a Python venv in .venv.
#   scripts/install.sh            runtime + test tools
#   scripts/install.sh bench      also wrk, gcc (bench/openloop.c), nginx + ModSecurity-nginx + echo
#   scripts/install.sh compose    also Debian's Docker engine and debootstrap (make test-compose)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
# docker-compose: only to check docker-compose.yml in the tests (no engine).
# prometheus: the tests check deploy/prometheus and run the dashboard's queries.
PKGS=(haproxy modsecurity-crs docker-compose prometheus)
[ "${1:-}" = bench ] && PKGS+=(wrk gcc libc6-dev nginx libnginx-mod-http-modsecurity libnginx-mod-http-echo)
# The Compose test starts dockerd itself (with its own flags), never the service.
[ "${1:-}" = compose ] && PKGS+=(docker.io debootstrap)
missing=()
for pkg in "${PKGS[@]}"; do
    # Installed, not merely known: a removed package keeps its config files.
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    # The haproxy service must not grab ports or run beside ours.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged services on install; stop them so they do not
# hold ports (HAProxy's default config) or CPU during tests and benchmarks.
# Only the packaged service instances are stopped, never our own processes.
for svc in haproxy nginx prometheus docker; do
    if [ -n "${missing[*]:-}" ] && [ -x "/etc/init.d/$svc" ]; then
        $SUDO "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
    echo "$want" > "$stamp"
fi
# The client library and the `modsec-spoa` command (pyproject.toml), installed
# editable: the venv runs this checkout's code. Its own stamp names the
# checkout, since worktrees may share one venv.
project_stamp=.venv/.project.sha
want=$( (cat pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$project_stamp" 2>/dev/null)" != "$want" ] || [ ! -x .venv/bin/modsec-spoa ]; then
    .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$want" > "$project_stamp"
fi
