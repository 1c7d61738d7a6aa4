#!/usr/bin/env bash
# Every GPU measurement of prac in one call (about 11 minutes on one H200), each part writing its
# JSON as soon as it is done, so a call cut short keeps what finished. Results go to $OUT (the
# device tool's folder) or bench/results/gpu/. The per-layer comparison with the reference
# SparseGPT needs a checkout of IST-DASLab/sparsegpt in $PRAC_REFERENCE (never part of prac);
# without one that part is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA GPU'" || exit 1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dest="${OUT:-bench/results/gpu}"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$dest/gpu_info.csv" 2>&1
step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee "$dest/$name.log"
}
# 1. per layer: where admm's time goes, and prac's SparseGPT against the reference
step admm_profile 50 python3 bench/admm_profile.py --device cuda --out "$dest/admm_profile.json"
if [ -n "${PRAC_REFERENCE:-}" ]; then
  step reference_sparsegpt 50 python3 bench/reference_sparsegpt.py --reference "$PRAC_REFERENCE" --device cuda \
    --out "$dest/reference_sparsegpt.json"
fi
# 1b. linears that share an input (q/k/v, gate/up of 7B shape): one by one vs one sweep
step group_sweep 60 python3 bench/group_sweep.py --device cuda --repeats 2 --out "$dest/group_sweep.json"
# 2. two blocks of Mistral-7B shape, every configuration (time per phase, peak and cache memory)
step blocks2 170 python3 bench/gpu_prune.py --device cuda --blocks 2 --no-depth-check --out "$dest/gpu_2blocks.json" \
  --runs wanda sparsegpt admm sparsegpt+optimal+dt sparsegpt+cache2g sparsegpt+reconstruct
# 3. two blocks of Mixtral-8x7B shape (8 experts, top-2): the MoE path at size
step moe2 80 python3 bench/gpu_prune.py --device cuda --moe --blocks 2 --no-depth-check --out "$dest/gpu_moe_2blocks.json" \
  --runs wanda sparsegpt
# 4. the whole 7B model: Wanda and SparseGPT
step whole7b 200 python3 bench/gpu_prune.py --device cuda --no-depth-check --out "$dest/gpu_7b.json" --runs wanda sparsegpt
# 5. structured pruning on the bundled model (the GPU machine has no SmolLM2 cache): prac's search and
# tuning against Wanda-sp, then the saved folders' prefill and decoding against the dense one on the GPU
step structured 120 python3 bench/structured.py run --protocol bundled --results "$dest/structured" \
  --rows 'dense,prac@0.75,prac@0.5,wanda-sp@0.75,shortgpt@0.75'
step structured_speed 60 python3 bench/structured.py speed --protocol bundled --results "$dest/structured" --device cuda
echo "=== done $(date +%T)"
