#!/usr/bin/env bash
# DeepSpeed ZeRO-3 training against one unsharded process, on the GPUs of this machine: the scenarios of
# tests/test_sharded.py (LoRA with the shared-weight teacher, GradCache and elastic depths; full fine-tuning with a
# separate teacher and GradCache; LoRA with the cached teacher, stopped and resumed from its ZeRO-3 checkpoint) in
# float32, launched by `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`, one process per
# GPU (one GPU runs ZeRO-3's partitioned code path in one process). Passes when every step's loss, the weights after
# training and the final saves (LoRA merged from the gathered partitions) equal the unsharded run's.
#
#   bash bench/device_zero3.sh [OUT]        # needs deepspeed installed; about 2 minutes on one GPU
#
# tests/test_sharded.py runs the same comparison on 2 CPU processes; this one runs it on CUDA devices over NCCL, with
# peft's own ZeRO-3 set-up of the trained token row (CUDA only; docs/training.md, "At scale").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/puma-zero3}}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "device_zero3.sh: no GPU on this machine"; exit 1; }
python -c "import deepspeed" 2>/dev/null || { echo "device_zero3.sh: deepspeed is not installed (pip install deepspeed)"; exit 1; }
PROCESSES=$(( GPUS >= 2 ? 2 : 1 ))
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$OUT"

echo "== scenarios: a tiny random checkpoint in float32, its teacher cache ($PROCESSES process(es) of ZeRO-3) =="
python - "$OUT" "$PROCESSES" <<'EOF'
import sys

import torch

from test_sharded import prepare
from tiny_puma import build_tiny_checkpoint

out, processes = sys.argv[1], int(sys.argv[2])
prepare(out, build_tiny_checkpoint(f"{out}/tiny", "qwen2_vl", "old", 1, seed=0), torch.float32, processes)
EOF

echo "== one unsharded process =="
python - "$OUT" <<'EOF'
import json, sys

from sharded_scenarios import run_scenarios

out = sys.argv[1]
scenarios = json.load(open(f"{out}/scenarios.json"))
run_scenarios([{k: v for k, v in s.items() if k != "resume_at"} for s in scenarios], f"{out}/one")
EOF

echo "== ZeRO-3 =="
accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes "$PROCESSES" \
    --mixed_precision no --main_process_port 29533 tests/sharded_scenarios.py "$OUT/scenarios.json" "$OUT/zero3" zero3

echo "== comparison =="
python - "$OUT" "$PROCESSES" <<'EOF'
import sys

from test_sharded import assert_same_training

# float32 on a GPU: reductions in another order and partition boundaries; 4096 ulps of float32 is about 5e-4 relative
assert_same_training(f"{sys.argv[1]}/zero3", sys.argv[1], processes=int(sys.argv[2]), ulps=4096)
print("ZeRO-3 equals the unsharded run: losses, weights, resumed checkpoint, merged final save")
EOF
