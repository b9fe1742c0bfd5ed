#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package when they are missing, for the
# deploy tests (they run their own prometheus on 127.0.0.1 with a free port and a temporary storage dir).
#
# The package's service must not stay running on its default port: a policy-rc.d that forbids starting
# services is put in place for the install if none exists, and the service is stopped afterwards should
# it have been started anyway.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus and promtool already installed: $(command -v prometheus) $(command -v promtool)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "need root to apt-get install prometheus" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on this machine" >&2
    exit 2
fi

created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# polyhead tests: do not start services during apt-get install\nexit 101\n' \
        > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends prometheus

# Belt and braces: never leave the packaged service running on :9090.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop prometheus 2>/dev/null || true
    systemctl disable prometheus 2>/dev/null || true
elif [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
command -v prometheus
command -v promtool
prometheus --version 2>&1 | head -1
