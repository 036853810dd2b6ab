#!/usr/bin/env bash
# GPU check of FLUX --fp8_base / --blocks_to_swap training on the tiny model (run on a lent GPU, like
# run_gpu_checks.sh; needs the wheels in .whl/, see docs/benchmarks.md). Writes into $OUT:
#   diag.jsonl    bench/flux_lowvram_diag.py per SDPA setting (training default, PyTorch's default, math):
#                 per variant losses, gradient norms, non-finite gradients (+ the anomaly-mode op)
#   summary.txt   flux_train_network.py runs with each flag: exit status, last line, GPU memory lines
#   pytest.txt    tests/test_flux_lowvram.py (its CUDA-only test included)
set -uo pipefail
. bench/gpu_env.sh
T=/tmp/lv
for sdpa in training all math; do
  python3 bench/flux_lowvram_diag.py --steps 3 --sdpa $sdpa 2>&1 | grep '^{' | sed "s/^{/{\"sdpa\": \"$sdpa\", /" | tee -a "$OUT/diag.jsonl"
done
python3 - <<PY
from library.models.tiny_flux import save_tiny_flux
from library.data.synthetic import make_shapes_dataset
save_tiny_flux("$T/m", "single_file", seed=0)
make_shapes_dataset("$T/img", 4, sizes=[(64, 64)], seed=0)
open("$T/ds.toml", "w").write("[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = '$T/img'\n")
PY
common="--pretrained_model_name_or_path $T/m --dataset_config $T/ds.toml --network_module networks.lora_flux --network_dim 4
 --network_alpha 4 --learning_rate 1e-3 --max_train_steps 3 --seed 1 --optimizer_type AdamW --t5xxl_max_token_length 16
 --timestep_sampling shift --model_prediction_type raw --guidance_scale 1.0 --mixed_precision bf16 --output_name lora"
for v in "plain:" "gc:--gradient_checkpointing" "swap:--gradient_checkpointing --blocks_to_swap 2" "fp8:--fp8_base" \
         "fp8gc:--fp8_base --gradient_checkpointing" "fp8swap:--fp8_base --gradient_checkpointing --blocks_to_swap 2" \
         "gc_cudnn:--gradient_checkpointing --sdpa_cudnn"; do
  n=${v%%:*}; f=${v#*:}
  python3 flux_train_network.py $common --output_dir $T/$n --loss_log_file "$OUT/loss_$n.jsonl" $f > $T/$n.log 2>&1
  echo "train $n rc=$? $(grep -c 'Traceback' $T/$n.log) tracebacks; $(grep 'GPU memory' $T/$n.log | tr '\n' ' '); $(tail -n 1 $T/$n.log | cut -c1-300)" | tee -a "$OUT/summary.txt"
done
python3 -m pytest -q -p no:cacheprovider tests/test_flux_lowvram.py 2>&1 | tail -n 5 | tee "$OUT/pytest.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >> "$OUT/summary.txt"
