#!/usr/bin/env bash
# Sets everything up, starts tritonserver with libtriton_rust.so on model-repository/,
# sends one sample request to each model and prints the answers, then keeps serving
# until Ctrl-C. `--once` stops after the sample requests.
#   HTTP_PORT (8000), GRPC_PORT (8001), METRICS_PORT (8002), BIND_ADDRESS (127.0.0.1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
once=false
[ "${1:-}" = "--once" ] && once=true

bash scripts/setup.sh

HTTP_PORT="${HTTP_PORT:-8000}"
GRPC_PORT="${GRPC_PORT:-8001}"
METRICS_PORT="${METRICS_PORT:-8002}"
BIND_ADDRESS="${BIND_ADDRESS:-127.0.0.1}"
URL="http://127.0.0.1:$HTTP_PORT"

"$TRITONSERVER" \
  --model-repository="$REPO_ROOT/model-repository" \
  --backend-directory="$BACKEND_DIR" \
  --model-control-mode=explicit --load-model='*' \
  --http-address="$BIND_ADDRESS" --http-port="$HTTP_PORT" \
  --grpc-address="$BIND_ADDRESS" --grpc-port="$GRPC_PORT" \
  --metrics-address="$BIND_ADDRESS" --metrics-port="$METRICS_PORT" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null' EXIT INT TERM

"$PYTHON" - "$URL" <<'PY'
import json, sys, time
import requests

url = sys.argv[1]
deadline = time.monotonic() + 120
while True:
    try:
        if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
            break
    except requests.RequestException:
        pass
    if time.monotonic() > deadline:
        sys.exit("tritonserver did not become ready")
    time.sleep(0.5)

samples = [
    ("sentiment-classifier", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                          "data": ["This is a great day!"]}]}),
    ("bert-base", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                               "data": ["This is a great day!"]}],
                   "outputs": [{"name": "embedding"}]}),
    ("gpt2-small", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                "data": ["The weather today is"]}],
                    "parameters": {"max_new_tokens": 20, "do_sample": False}}),
    # The A/B router: its response parameters name the version that served it.
    ("sentiment-classifier-ab", {"inputs": [{"name": "text_input", "shape": [1],
                                             "datatype": "BYTES", "data": ["This is a great day!"]}]}),
]
for model, body in samples:
    print(f"\n$ curl -X POST {url}/v2/models/{model}/infer -d '{json.dumps(body)}'")
    response = requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
    answer = response.json()
    for output in answer.get("outputs", []):
        if len(output["data"]) > 8:
            output["data"] = output["data"][:8] + ["..."]
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    response.raise_for_status()

# Token streaming: one server-sent event per new piece of text.
body = {"text_input": "The weather today is", "parameters": {"max_new_tokens": 12, "do_sample": False}}
print(f"\n$ curl -N -X POST {url}/v2/models/gpt2-small-stream/generate_stream -d '{json.dumps(body)}'")
with requests.post(f"{url}/v2/models/gpt2-small-stream/generate_stream", json=body,
                   stream=True, timeout=30) as response:
    response.raise_for_status()
    for line in response.iter_lines(decode_unicode=True):
        if line:
            print(line)
PY

if $once; then
  exit 0
fi
echo
echo "Serving on $URL (gRPC $BIND_ADDRESS:$GRPC_PORT, metrics :$METRICS_PORT). Ctrl-C to stop."
wait "$server_pid"
