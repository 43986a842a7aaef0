#!/usr/bin/env bash
# bench_serve.py on one GPU: vLLM's GPU package (`vllm serve`, the export card's GPU command) in bfloat16 on a random
# checkpoint of Qwen2-VL-2B's shape, pruned to 12 of 28 layers, against the full depth and against `encode` in
# bfloat16; then the load test. Writes the stamped tables to $OUT (or bench_data/).
#
#   bash bench/device_bench_serve.sh                     # python3 must import vllm (else PUMA_VLLM_PYTHON names one)
#
# About 8 minutes on an H100: two server starts (~1 min each), three passes of 2,048 texts and 512 images per
# setting, a 2,000-request load test.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PYTHON=${PUMA_VLLM_PYTHON:-python3}
OUT_DIR=${OUT:-bench_data}
mkdir -p "$OUT_DIR"
if ! "$VLLM_PYTHON" -c "import vllm" 2>/dev/null; then
  echo "vLLM's GPU package does not import with $VLLM_PYTHON: install it (pip install vllm) or set PUMA_VLLM_PYTHON" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
python3 bench/bench_serve.py --vllm-python "$VLLM_PYTHON" --serve gpu --dtype bfloat16 --shape 2b --layers 12 \
  --device cuda --encode-dtype bfloat16 --texts 2048 --images 512 --image-size 448 --batch-size 64 \
  --concurrency 8 --repeats 3 --data /tmp/puma_bench_serve --markdown "$OUT_DIR/serve_gpu.md"
python3 bench/bench_serve.py --vllm-python "$VLLM_PYTHON" --serve gpu --dtype bfloat16 --shape 2b --layers 12 \
  --load --requests 2000 --concurrency 16 --data /tmp/puma_bench_serve --markdown "$OUT_DIR/serve_load_gpu.md"
