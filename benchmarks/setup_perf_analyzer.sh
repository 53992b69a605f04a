#!/usr/bin/env bash
# Set up Triton's perf_analyzer from the package registries only, into a cache folder:
#   - the binary shipped inside the tritonclient==2.50.0 wheel (pip download --no-deps, unzip);
#     newer wheels' binaries need a newer glibc than Debian 12's 2.36;
#   - Debian's libb64-0d (apt-get, when root and missing);
#   - libcudart.so.12 from the PyPI package nvidia-cuda-runtime-cu12: perf_analyzer links it even
#     when no GPU is used, so it only has to be loadable (no GPU or driver needed).
# Prints the path of a wrapper script that sets LD_LIBRARY_PATH and execs perf_analyzer.
# Idempotent: a second run only checks. Usage: setup_perf_analyzer.sh [CACHE_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${1:-$here/.peers/perf_analyzer}"
pip="${PIP:-$here/../.venv/bin/pip}"
[[ -x "$pip" ]] || pip="python3 -m pip"
TRITONCLIENT_VERSION="${TRITONCLIENT_VERSION:-2.50.0}"

log() { printf 'setup_perf_analyzer: %s\n' "$*" >&2; }

mkdir -p "$cache/wheels" "$cache/bin" "$cache/lib"
wrapper="$cache/perf_analyzer"

if [[ ! -x "$cache/bin/perf_analyzer" ]]; then
    log "downloading tritonclient==$TRITONCLIENT_VERSION (for its perf_analyzer binary)"
    $pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
        "tritonclient==$TRITONCLIENT_VERSION" -d "$cache/wheels" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    whl="$(ls "$cache"/wheels/tritonclient-"$TRITONCLIENT_VERSION"-*.whl | head -n1)"
    unzip -o -q -j "$whl" "tritonclient-$TRITONCLIENT_VERSION.data/data/bin/perf_analyzer" -d "$cache/bin"
    chmod 0755 "$cache/bin/perf_analyzer"
fi

if [[ ! -e "$cache/lib/libcudart.so.12" ]]; then
    log "downloading nvidia-cuda-runtime-cu12 (libcudart.so.12, linked but unused on CPU)"
    $pip download -q --no-deps --only-binary=:all: nvidia-cuda-runtime-cu12 -d "$cache/wheels" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    whl="$(ls "$cache"/wheels/nvidia_cuda_runtime_cu12-*.whl | head -n1)"
    unzip -o -q -j "$whl" 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$cache/lib"
fi

if ! dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q '^install ok installed$'; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian's libb64-0d"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
    else
        log "libb64-0d is missing and this is not root: run 'sudo apt-get install -y libb64-0d'"
        exit 1
    fi
fi

cat >"$wrapper" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cache/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$cache/bin/perf_analyzer" "\$@"
EOF
chmod 0755 "$wrapper"

missing="$(LD_LIBRARY_PATH="$cache/lib" ldd "$cache/bin/perf_analyzer" | grep 'not found' || true)"
if [[ -n "$missing" ]]; then
    log "perf_analyzer still misses libraries:"
    printf '%s\n' "$missing" >&2
    exit 1
fi
echo "$wrapper"
