#!/usr/bin/env bash
# System packages the deploy tests and benchmarks need, installed only when missing:
#   prometheus  - ships `promtool` (alert-rule checks) and the server the integration test starts by hand
#   libb64-0d   - runtime library of Triton's perf_analyzer (benchmarks)
# Idempotent and quiet. Never fails the build: without root (or without apt) it says why and
# returns 0, and the tests that need these tools skip with a message naming this script.
# Prometheus is never started as a service here; the tests run their own instance.
set -euo pipefail

# $PRUNESERVE_SYSTEM_PACKAGES overrides the list (the tests use it to exercise the branches).
read -r -a PACKAGES <<<"${PRUNESERVE_SYSTEM_PACKAGES:-prometheus libb64-0d}"

log() { printf 'install-system-deps: %s\n' "$*" >&2; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    # `dpkg-query -W` succeeds for removed-but-configured packages too, so check the status word.
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found; install ${missing[*]} with your package manager (tests needing them will skip)"
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    log "not root; run 'sudo apt-get install -y ${missing[*]}' (tests needing them will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log "installing ${missing[*]}"
# policy-rc.d 101 stops Debian's maintainer scripts from starting the prometheus service:
# the tests start their own instance on a free port, and no init system may own one here.
policy=/usr/sbin/policy-rc.d
created_policy=0
# apt's output is kept and shown only when a step fails.
apt_log="$(mktemp)"
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    rm -f "$apt_log"
    if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    created_policy=1
fi

if ! apt-get update -qq >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    log "apt-get update failed; tests needing ${missing[*]} will skip"
    exit 0
fi
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    log "apt-get install ${missing[*]} failed; tests needing them will skip"
    exit 0
fi
log "installed ${missing[*]}"
