#!/usr/bin/env bash
# Install the pruneserve *server* into a fresh virtual environment: the project with the
# `cpu` or `gpu` extra and the pins of deploy/docker/constraints.txt, never torch or
# transformers. The server Dockerfiles RUN exactly this, and tests/deploy runs it into a
# temporary venv, so what the images contain is what CI verified.
#
#   install-server.sh --venv DIR --flavor cpu|gpu [--src DIR] [--python PYTHON]
#
# Ends by checking the install: `pruneserve serve --help` runs, torch/transformers are not
# importable, and ONNX Runtime offers the providers the flavor promises.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/../.." && pwd)"
venv=""
flavor=""
python="${PYTHON:-python3}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) venv="$2"; shift 2 ;;
        --flavor) flavor="$2"; shift 2 ;;
        --src) src="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "install-server.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ -n "$venv" ]] || { echo "install-server.sh: --venv DIR is required" >&2; usage; }
case "$flavor" in
    cpu) providers_expected="CPUExecutionProvider" ;;
    gpu) providers_expected="TensorrtExecutionProvider CUDAExecutionProvider CPUExecutionProvider" ;;
    *) echo "install-server.sh: --flavor must be cpu or gpu, got '${flavor}'" >&2; usage ;;
esac
constraints="$src/deploy/docker/constraints.txt"
[[ -f "$constraints" ]] || { echo "install-server.sh: $constraints not found" >&2; exit 1; }

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# A non-editable install: the image must not depend on the source tree staying around.
"${pip[@]}" install -q -c "$constraints" "${src}[${flavor}]"

# Checked from / so that a source tree in the working directory cannot shadow the install.
cd /
"$venv/bin/pruneserve" serve --help >/dev/null
"$venv/bin/python" - "$providers_expected" <<'PY'
"""Fail the build when the server install drags in the optimizer's stack or lacks providers."""
import importlib.util
import sys

heavy = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is not None]
if heavy:
    sys.exit(f"install-server.sh: {heavy} importable in the server install; a dependency pulled them in")
import onnxruntime

available = set(onnxruntime.get_available_providers())
missing = [p for p in sys.argv[1].split() if p not in available]
if missing:
    sys.exit(f"install-server.sh: onnxruntime {onnxruntime.__version__} lacks {missing} (has {sorted(available)})")
PY
echo "install-server.sh: pruneserve server ($flavor) installed in $venv"
