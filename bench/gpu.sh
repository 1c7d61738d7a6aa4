#!/usr/bin/env bash
# Pruning at Mistral-7B size on a CUDA machine: time per phase and peak GPU memory (see gpu_prune.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA GPU'"
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python3 bench/gpu_prune.py --device cuda --out bench/results/gpu.json "$@"
# The per-layer comparison once (delete its JSON to measure again).
if [ ! -e bench/results/layer_speed_gpu.json ]; then
  PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python3 bench/layer_speed.py --device cuda \
    --methods full,diagonal,greedy,optimal,optimal@1e-4,optimal@1e-1 --out bench/results/layer_speed_gpu.json
fi
