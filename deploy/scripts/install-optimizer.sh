#!/usr/bin/env bash
# Install the pruneserve *optimizer* (torch, transformers, onnx, the default model, and the
# openvino extra: NNCF for static INT8, OpenVINO to measure it) into a fresh virtual
# environment. deploy/docker/optimizer.Dockerfile RUNs exactly this.
#
#   install-optimizer.sh --venv DIR [--src DIR] [--python PYTHON] [--dry-run]
#
# torch goes first and alone, pinned ($TORCH_SPEC, default torch==2.13.0): left to the
# resolver it pulls the multi-GB CUDA build. Where the CPU build is not on the default
# index, point $TORCH_INDEX_URL at an index that has it (the Dockerfile does).
# --dry-run resolves everything against the pins without installing (what CI checks).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/../.." && pwd)"
venv=""
python="${PYTHON:-python3}"
dry_run=()
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
# openvino brings NNCF: without it static INT8 (--target tensorrt, --quantize auto) falls back to
# ONNX Runtime's quantizer, which keeps less quality on MiniLM.
extras="cpu,optimizer,default-model,openvino"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) venv="$2"; shift 2 ;;
        --src) src="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --dry-run) dry_run=(--dry-run); shift ;;
        -h|--help) usage ;;
        *) echo "install-optimizer.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ -n "$venv" ]] || { echo "install-optimizer.sh: --venv DIR is required" >&2; usage; }
constraints="$src/deploy/docker/constraints.txt"
[[ -f "$constraints" ]] || { echo "install-optimizer.sh: $constraints not found" >&2; exit 1; }

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
torch_index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_index=(--index-url "$TORCH_INDEX_URL")
fi
"${pip[@]}" install -q "${dry_run[@]}" "${torch_index[@]}" "$torch_spec"
if [[ ${#dry_run[@]} -gt 0 ]]; then
    # torch is not installed by a dry run; resolve the rest with it given, as a real run would.
    "${pip[@]}" install -q --dry-run -c "$constraints" "$torch_spec" "${src}[${extras}]"
    echo "install-optimizer.sh: dry run resolved"
    exit 0
fi
"${pip[@]}" install -q -c "$constraints" "${src}[${extras}]"

cd /  # so that a source tree in the working directory cannot shadow the install
"$venv/bin/pruneserve" optimize --help >/dev/null
"$venv/bin/python" -c "import torch, transformers, onnx, onnxruntime, nncf, openvino; import pruneserve.optimizer"
echo "install-optimizer.sh: pruneserve optimizer installed in $venv"
