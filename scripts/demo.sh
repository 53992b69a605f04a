#!/usr/bin/env bash
# `make demo`: optimize the embedded default model (all-MiniLM-L6-v2), serve it on
# 127.0.0.1 and query it with a real gRPC client and over HTTP (OpenAI-style /v1/embeddings);
# the server is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
ART=${DEMO_MODEL:-artifacts/minilm}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
HTTP_PORT=${HTTP_PORT:-8000}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ -f "$ART/manifest.json" ]]; then
  echo "== reusing $ART (delete it to optimize again)"
else
  echo "== optimizing the default model into $ART"
  "$BIN/pruneserve" optimize --out "$ART"
fi
echo "== report: $ART/report.md"

echo "== serving $ART on 127.0.0.1:$GRPC_PORT (HTTP on :$HTTP_PORT, metrics on :$METRICS_PORT)"
"$BIN/pruneserve" serve "$ART" --host 127.0.0.1 --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
  --metrics-host 127.0.0.1 --metrics-port "$METRICS_PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

MODEL=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$ART/manifest.json")
for _ in $(seq 1 120); do
  if "$BIN/pruneserve" infer --url "127.0.0.1:$GRPC_PORT" --model "$MODEL" --ready >/dev/null 2>&1; then break; fi
  kill -0 $SERVER 2>/dev/null || { echo "server exited"; exit 1; }
  sleep 0.5
done

echo "== querying $MODEL over gRPC (pruneserve infer prints JSON; summarised here)"
"$BIN/pruneserve" infer --url "127.0.0.1:$GRPC_PORT" --model "$MODEL" \
  --text "A cheap encoder still understands sentences." \
  --text "A small encoder still understands text." \
  --text "The weather is cold in November." > "$ART.demo-answer.json"
"$BIN/python" - "$ART.demo-answer.json" <<'PY'
import json, sys
import numpy as np
answer = json.load(open(sys.argv[1]))
for name, value in answer["outputs"].items():
    arr = np.asarray(value)
    print(f"{name}: shape {list(arr.shape)}, first values {np.round(arr[0, :4], 4).tolist()}")
    if name == "embedding":
        unit = arr / np.linalg.norm(arr, axis=1, keepdims=True)
        print(f"cosine(text 1, text 2) = {unit[0] @ unit[1]:.3f} (similar); cosine(text 1, text 3) = {unit[0] @ unit[2]:.3f} (unrelated)")
PY
echo "== querying $MODEL over HTTP: POST /v1/embeddings (OpenAI-compatible)"
"$BIN/python" - "$HTTP_PORT" "$MODEL" <<'PY'
import json, sys, urllib.request
body = json.dumps({"model": sys.argv[2], "input": ["A cheap encoder still understands sentences."]}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/embeddings", data=body,
                                 headers={"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=30))
vector = answer["data"][0]["embedding"]
print(f"embedding: {len(vector)} floats, first {[round(v, 4) for v in vector[:4]]}; usage {answer['usage']}")
PY
echo "== metrics (excerpt)"
"$BIN/python" - "$METRICS_PORT" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(("pruneserve_requests_total", "pruneserve_inferences_total", "pruneserve_model_info")):
        print(line)
PY
