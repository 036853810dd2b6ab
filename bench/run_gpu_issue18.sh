#!/usr/bin/env bash
# Issue #18's GPU figures in one command sized for a 15-minute device lease (about 9 minutes of command time on an
# H200; each part has its own time limit, and a part that fails or runs out of time does not stop the next). In
# order of what the goals need:
#   1. tests/test_step_readback.py's CUDA test: no host sync from our code on the training step (sync debug mode),
#      with fused AdamW and with AdamW8bit (whose NaN guard undoes a bad step on the device)
#   2. bench/bench_flux_swap_speed.py: block swap's step-time ratio (goal <= 1.3) and the memory it saves
#   3. bench/bench_step_mfu.py: SDXL LoRA 1024 px batch 4 bf16, ours and diffusers + PEFT, MFU (goal >= 40 %),
#      with a torch.profiler trace of one step of each (what to make faster next)
#   4. tests/test_flux_lowvram.py's CUDA test: equal losses with and without swap (and fp8)
# Wheels the GPU image lacks (diffusers, toml, ...) travel in .whl/ (see docs/benchmarks.md). Results go to $OUT.
set -uo pipefail
. bench/gpu_env.sh
start=$(date +%s)
part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output, note its status and duration
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$(( $(date +%s) - t0 ))s" | tee -a "$OUT/parts.txt"
  tail -n 6 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
part syncs 170 python3 -m pytest -q -s -p no:cacheprovider \
  tests/test_step_readback.py::test_no_synchronising_cuda_call_from_our_code_on_the_step
part swap_speed 170 python3 bench/bench_flux_swap_speed.py --json "$OUT/flux_swap_speed.jsonl"
part step_mfu_sdxl 170 python3 bench/bench_step_mfu.py --device cuda --families sdxl --batch_sizes 4 --gc off \
  --steps 6 --warmup 3 --variant_timeout 80 --profile "$OUT/profile" --json "$OUT/step_mfu_sdxl_b4.json"
part swap_equal 60 python3 -m pytest -q -p no:cacheprovider \
  tests/test_flux_lowvram.py::test_flux_training_with_blocks_to_swap_gives_the_same_losses_on_cuda
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/parts.txt"
